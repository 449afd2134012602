"""Tables, plots and paired comparisons of evaluation results (`run.evaluate` JSON files).

- `format_table(results)`: one Markdown table, a row per suite metric, a column per model
  (base, baselines, rounds in the order given): value with its 95% interval and n.
- `write_report(results, out_dir)`: report.md (that table, the paired comparisons, wall times,
  what each suite measures) and one PNG per metric, value and interval over the labels in order.
- `compare(a, b)`: every metric both results share, paired on the items both scored,
  with the exact McNemar p-value and Newcombe's interval of the difference;
  `paired_rows(results, pairs)`: the same for chosen (model, reference) pairs, the paired table
  of report.md, report.html and align's printed summary.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from localalign.evaluation.stats import (ALPHA, PairedComparison, compare_paired, detectable_difference,
                                        min_detectable_difference, min_flips)
from localalign.fsutil import atomic_write, atomic_write_text



def _metric_columns(results: dict[str, dict]) -> list[tuple[str, str]]:
    """(suite, metric) pairs in first-seen order across all results."""
    columns: list[tuple[str, str]] = []
    for result in results.values():
        for suite, data in result["suites"].items():
            for metric in data["metrics"]:
                if (suite, metric) not in columns:
                    columns.append((suite, metric))
    return columns


def metric_cell(record: dict | None, ci_digits: int = 3, with_n: bool = True, missing: str = "-") -> str:
    """One metric record of an eval.json as text: value [95% interval] n=items, or `missing`."""
    if not record or not record.get("n"):
        return missing
    cell = f"{record['value']:.3f} [{record['ci_low']:.{ci_digits}f}, {record['ci_high']:.{ci_digits}f}]"
    return cell + (f" n={record['n']}" if with_n else "")


def format_table(results: dict[str, dict]) -> str:
    """A Markdown table: one row per suite metric, one column per label (in order)."""
    labels = [label + (" (limited)" if r.get("limited") else "") for label, r in results.items()]
    lines = ["| suite / metric | " + " | ".join(labels) + " |", "|" + "---|" * (len(labels) + 1)]
    for suite, metric in _metric_columns(results):
        name = f"{suite} / {metric}" + ("" if _higher_better(results, suite, metric) else " (lower is better)")
        cells = [metric_cell(r["suites"].get(suite, {}).get("metrics", {}).get(metric)) for r in results.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _higher_better(results: dict[str, dict], suite: str, metric: str) -> bool:
    for result in results.values():
        record = result["suites"].get(suite, {}).get("metrics", {}).get(metric)
        if record is not None:
            return record.get("higher_is_better", True)
    return True


def format_wall_times(results: dict[str, dict]) -> str:
    suites = []
    for result in results.values():
        suites += [s for s in result["suites"] if s not in suites]
    lines = ["| model | load | " + " | ".join(suites) + " | total |", "|" + "---|" * (len(suites) + 3)]
    for label, result in results.items():
        cells = [_wall_cell(result["suites"][s]) if s in result["suites"] else "-" for s in suites]
        lines.append(f"| {label} | {result.get('load_s', 0):.1f} s | " + " | ".join(cells) + f" | {result.get('wall_s', 0):.1f} s |")
    return "\n".join(lines)


def _wall_cell(suite: dict) -> str:
    text = f"{suite['wall_s']:.1f} s, {suite['n_items']} items"
    if suite.get("reply_tokens"):
        text += f", {suite['reply_tokens']} tokens ({suite['reply_tokens'] / max(suite['wall_s'], 1e-9):.0f}/s)"
    return text


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def plot_metric(results: dict[str, dict], suite: str, metric: str, path: Path) -> Path:
    """One PNG: the metric's value and 95% interval for each label, in order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, values, lows, highs = [], [], [], []
    for label, result in results.items():
        record = result["suites"].get(suite, {}).get("metrics", {}).get(metric)
        if record and record.get("n"):
            labels.append(label)
            values.append(record["value"])
            lows.append(record["value"] - record["ci_low"])
            highs.append(record["ci_high"] - record["value"])
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(labels) + 2), 3.2), dpi=100)
    x = list(range(len(labels)))
    ax.errorbar(x, values, yerr=[lows, highs], fmt="o-", capsize=4)
    ax.set_xticks(x, labels, rotation=30 if len(labels) > 4 else 0, ha="right" if len(labels) > 4 else "center")
    ax.set_xlim(-0.5, len(labels) - 0.5)
    ax.set_ylim(-0.02, 1.02)
    direction = "higher" if _higher_better(results, suite, metric) else "lower"
    ax.set_title(f"{suite}: {metric} ({direction} is better, 95% CI)", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_write(path, "wb", encoding=None) as f:
        fig.savefig(f, format="png")
    plt.close(fig)
    return path


def format_data_reports(data: dict[str, dict]) -> str:
    """One row per round: what its accepted data teaches, measured against the seeds."""
    names = [("accepted", "accepted"), ("rejected", "rejected"), ("refusals", "refusals"),
             ("kind_agreement", "right kind"), ("constraints_met", "constraints met"), ("seed_agreement", "agrees with seed")]
    lines = ["| round | " + " | ".join(title for _, title in names) + " |", "|---" * (len(names) + 1) + "|"]
    for label, report in data.items():
        cells = []
        for key, _ in names:
            value = report.get(key)
            if isinstance(value, dict):
                cells.append("n/a" if value.get("value") is None else f"{value['value']:.2f} (n={value['n']})")
            else:
                cells.append("" if value is None else str(value))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(results: dict[str, dict], out_dir: str | Path, data_reports: dict[str, dict] | None = None,
                 pairs: list[tuple[str, str]] | None = None) -> Path:
    """report.md + one PNG per metric under `out_dir`; labels keep the order of `results`.
    `data_reports`: each round's data report (isara/data_report.py), shown as its own table;
    `pairs`: the (model, reference) comparisons of the paired table (`default_pairs` when None)."""
    if not results:
        raise ValueError("no results to report")
    paired = paired_rows(results, default_pairs(results) if pairs is None else pairs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = []
    for suite, metric in _metric_columns(results):
        name = f"{_slug(suite)}__{_slug(metric)}.png"
        plot_metric(results, suite, metric, out_dir / name)
        plots.append((suite, metric, name))
    descriptions = {}
    for result in results.values():
        for suite, data in result["suites"].items():
            descriptions.setdefault(suite, data.get("description", ""))
    parts = [
        "# Evaluation report",
        "",
        "Greedy decoding, offline, no judge model. Each cell: value [95% Wilson interval] n=items. "
        "Instruction- and constraint-level intervals treat instructions as independent, though "
        "instructions of one prompt are not; read them as optimistic.",
        "",
        format_table(results),
        "",
        *(["## Paired comparisons", "", PAIRED_NOTE, "", format_paired_table(paired), ""] if paired else []),
        *(["## Data", "",
           "What each round's accepted pairs teach, against the seeds (isara/data_report.py): the share "
           "whose response is the kind their nearest seeds give, that meet the constraints their prompt "
           "states, that say what the seed with a near-identical prompt says.", "",
           format_data_reports(data_reports), ""] if data_reports else []),
        "## Suites",
        "",
        *[f"- **{s}**: {d}" for s, d in descriptions.items()],
        "",
        "## Wall time",
        "",
        format_wall_times(results),
        "",
        "## Models",
        "",
        *[
            f"- {label}: `{r['model']}`" + (f" + adapter `{r['lora']}`" if r.get("lora") else "")
            + (f" (first {r['limit']} items of each suite)" if r.get("limited") else "")
            for label, r in results.items()
        ],
        "",
        "## Plots",
        "",
        *[f"![{s} {m}]({name})" for s, m, name in plots],
        "",
    ]
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(parts))
    return path


@dataclass
class MetricComparison:
    suite: str
    metric: str
    paired: PairedComparison
    higher_is_better: bool

    def verdict(self, alpha: float = ALPHA) -> str:
        """'better' or 'worse' (B against A, by the metric's direction) where the exact McNemar
        test is significant at `alpha`; '' where it is not."""
        if not self.paired.significant(alpha):
            return ""
        return "better" if (self.paired.diff > 0) == self.higher_is_better else "worse"


def compare(a: dict, b: dict) -> list[MetricComparison]:
    """Every metric present in both results, paired on shared items (exact McNemar, Newcombe's
    interval); items only one side was scored on are counted in each comparison, not paired."""
    rows = []
    for suite, data_a in a["suites"].items():
        data_b = b["suites"].get(suite)
        if data_b is None:
            continue
        for metric, outcomes_a in data_a.get("outcomes", {}).items():
            outcomes_b = data_b.get("outcomes", {}).get(metric)
            if not outcomes_b or not (set(outcomes_a) & set(outcomes_b)):
                continue
            higher = data_a["metrics"][metric].get("higher_is_better", True)
            rows.append(MetricComparison(suite, metric, compare_paired(outcomes_a, outcomes_b), higher))
    return rows


def difference_cell(p: PairedComparison) -> str:
    """B - A with its 95% interval: '+0.208 [+0.04, +0.37]' (a bound that rounds to zero reads 0.00)."""
    bound = lambda x: "0.00" if abs(x) < 0.005 else f"{x:+.2f}"  # noqa: E731
    return f"{p.diff:+.3f} [{bound(p.ci_low)}, {bound(p.ci_high)}]"


def p_cell(p: float) -> str:
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _mdd_cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _n_cell(p: PairedComparison) -> str:
    unpaired = p.a_unpaired + p.b_unpaired
    return f"{p.n}" + (f" (+{unpaired} unpaired)" if unpaired else "")


def format_comparison(rows: list[MetricComparison], alpha: float = ALPHA) -> str:
    """`eval compare`'s table: B against A per metric, with the interval, the test and what the test could see."""
    lines = [
        "| suite / metric | n paired | A | B | B - A [95% CI] | A only | B only | p (McNemar exact) | significant "
        "| MDD | 80% power at this discordance |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p = r.paired
        verdict = f"yes, B {r.verdict(alpha)}" if r.verdict(alpha) else "no"
        discordance = (p.a_only + p.b_only) / p.n
        power = detectable_difference(p.n, discordance, alpha=alpha) if discordance else None
        lines.append(
            f"| {r.suite} / {r.metric} | {_n_cell(p)} | {p.a_value:.3f} | {p.b_value:.3f} | {difference_cell(p)} | "
            f"{p.a_only} | {p.b_only} | {p.p_value:.4f} | {verdict} | {_mdd_cell(min_detectable_difference(p.n, alpha))} | "
            f"{'none' if power is None else f'{power:.2f}'} |"
        )
    lines += ["", COMPARISON_NOTE,
              "80% power at this discordance: the true difference the test would declare 4 times in 5 if the "
              "share of items the two disagree on were the one seen here; 'none': not even with every "
              "disagreement one way."]
    return "\n".join(lines)


COMPARISON_NOTE = (
    f"Paired on the items both were scored on (items only one side has are counted as unpaired and left out). "
    f"Difference with Newcombe's 95% interval for paired proportions; p: two-sided exact McNemar test, "
    f"significant below {ALPHA}. MDD: the smallest difference that test can declare at that n, reached only "
    f"when all {min_flips()} or more disagreements go one way ({min_flips()}/n); a smaller difference is never "
    f"significant there."
)


# --------------------------------------------------------------------------- paired tables


def default_pairs(results: dict[str, dict]) -> list[tuple[str, str]]:
    """(model, reference) pairs to compare: every label after the first against the first (the base)."""
    labels = list(results)
    return [(label, labels[0]) for label in labels[1:]]


@dataclass
class PairedRow:
    """One model against one reference on one metric."""

    label: str
    reference: str
    row: MetricComparison


def paired_rows(results: dict[str, dict], pairs: list[tuple[str, str]],
                metrics: list[tuple[str, str]] | None = None) -> list[PairedRow]:
    """Each (model, reference) pair compared item by item (`compare`: A = the reference, B = the
    model), on `metrics` (suite, metric) when given, else on every metric both hold."""
    out = []
    for label, reference in pairs:
        if label not in results or reference not in results:
            continue
        for row in compare(results[reference], results[label]):
            if metrics is None or (row.suite, row.metric) in metrics:
                out.append(PairedRow(label, reference, row))
    if metrics is not None:  # in the order the caller's table shows the metrics
        out.sort(key=lambda r: (pairs.index((r.label, r.reference)), metrics.index((r.row.suite, r.row.metric))))
    return out


PAIRED_HEADER = ["model", "vs", "suite/metric", "n", "difference [95% CI]", "0->1", "1->0", "p", "verdict", "MDD"]
PAIRED_NOTE = (
    "Each model against a reference on the same items: difference = model - reference; 0->1 and 1->0: items whose "
    "outcome went from 0 to 1 and from 1 to 0; verdict: better or worse (by the metric's direction: a lower "
    "over-refusal rate is better) where the test is significant. "
    + COMPARISON_NOTE
)


def paired_cells(r: PairedRow) -> list[str]:
    """One row of the paired table as text, in the order of PAIRED_HEADER."""
    p = r.row.paired
    return [r.label, r.reference, f"{r.row.suite}/{r.row.metric}", _n_cell(p), difference_cell(p), str(p.b_only),
            str(p.a_only), p_cell(p.p_value), r.row.verdict(), _mdd_cell(p.mdd)]


def format_paired_table(rows: list[PairedRow]) -> str:
    """The paired rows as a Markdown table."""
    lines = ["| " + " | ".join(PAIRED_HEADER) + " |", "|" + "---|" * len(PAIRED_HEADER)]
    lines += ["| " + " | ".join(paired_cells(r)) + " |" for r in rows]
    return "\n".join(lines)
