"""report.html: what a run made, on one self-contained page (inline CSS and script, no network).

    write_html_report(run_dir, results=None, seeds=None, embedder=None, best=None, pairs=None) -> RUN/report.html

Everything on the page is read from the run directory as the stages left it, so the page can
be written at any point of a run and written again as it goes:

- the round table: every eval.json (base, baselines, rounds, in that order), each cell the
  value with its 95% interval and n, drawn as a bar too; the chosen round (manifest.json,
  stage "final", its "best") is marked;
- the paired comparisons (report.paired_rows): each model against a reference on the same
  items, the difference with its interval, the exact McNemar p and the smallest difference
  the test could declare at that n;
- the plots report.py wrote beside report.md, inlined as base64 PNGs;
- per-stage seconds and throughput from manifest.json (generation: decided samples per
  minute; training: tokens/s; evaluation: items and reply tokens per second);
- each round's data report (round-N/data-report.json);
- the sample browser: every accepted and rejected sample of every round and of the rehearsal
  data (round-N/, base/rehearsal/), with its reject reason, scores, nearest seed and the
  in-context examples it was written from; filters by round, verdict and reason, free-text
  search, and a URL fragment that sets them (`report.html#group=round-1&status=rejected&q=bomb`;
  `open=first` unfolds the first sample shown).

The nearest seed is found by embedding each sample and the seeds with the run's embedder when
one is given (a second or two for a few hundred samples on a laptop CPU; `align` passes one);
without it the page shows the stored novelty score alone. The in-context examples are the
`meta.examples` references (isara.step), resolved against the seeds and the samples kept in
each round's index/ and in the run.

The page's script uses `textContent` for every generated text, never markup: the samples
are model output and may contain anything.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
from collections import Counter
from pathlib import Path
from typing import Any

from localalign.evaluation.report import (PAIRED_HEADER, PAIRED_NOTE, _higher_better, _metric_columns, _slug,
                                         default_pairs, paired_cells, paired_rows)
from localalign.fsutil import atomic_write_text
from localalign.isara.step import _example_ref as example_ref
from localalign.samples import Sample, read_rejected

REPORT_NAME = "report.html"
NEAREST_CACHE = "report-nearest.json"  # sample -> nearest seed, so each sample is embedded once
BASELINE_ORDER = ("sft-seeds", "icl-knn", "urial")  # as align runs them


def write_html_report(run_dir: str | Path, results: dict[str, dict] | None = None, seeds: list[Sample] | None = None,
                      embedder=None, best: str | None = None, pairs: list[tuple[str, str]] | None = None) -> Path:
    """Write RUN/report.html from what the run directory holds (see the module docstring).
    `results`: the eval results by label, in table order (read from the run when None);
    `seeds`: the run's seeds (read from a round's index/ when None); `embedder`: an
    isara.retrieve.Embedder for the nearest seeds; `best`: the chosen label (else the manifest's);
    `pairs`: the (model, reference) comparisons of the paired table (every label against the
    first when None)."""
    d = Path(run_dir)
    results = collect_results(d) if results is None else results
    manifest = _read_json(d / "manifest.json") or {}
    stages = manifest.get("stages", {})
    best = best or stages.get("final", {}).get("best")
    config = _read_toml(d / "config.toml")
    browser = browser_data(d, seeds, embedder)
    body = [
        _header(d, config, best, (d / "final.gguf").exists()),
        _section("Held-out evaluation", _results_table(results, best)),
        _section("Paired comparisons", _paired_table(results, default_pairs(results) if pairs is None else pairs)),
        _section("Plots", _plots(d, results)) if results else "",
        _section("Stages", _stage_table(stages, results)),
        _section("Data per round", _data_table(d)),
        _section("Samples", _browser_shell(browser)),
    ]
    page = PAGE.format(title=html.escape(f"localalign: {d.resolve().name}"), css=CSS, body="\n".join(body),
                       data=_script_json(browser), script=SCRIPT)
    path = d / REPORT_NAME
    atomic_write_text(path, page)
    return path


def collect_results(run_dir: Path) -> dict[str, dict]:
    """Every eval.json of a run, labelled and ordered as align reports them: base, baselines, rounds."""
    d = Path(run_dir)
    paths = [("base", d / "base" / "eval.json")]
    baselines = sorted(d.glob("baselines/*/eval.json"), key=lambda p: (
        BASELINE_ORDER.index(p.parent.name) if p.parent.name in BASELINE_ORDER else len(BASELINE_ORDER), p.parent.name))
    paths += [(p.parent.name, p) for p in baselines]
    paths += [(p.parent.name, p) for p in sorted(d.glob("round-*/eval.json"), key=lambda p: _round_no(p.parent))]
    out = {}
    for label, path in paths:
        result = _read_json(path)
        if result and "suites" in result:
            out[label] = result
    return out


def sample_groups(run_dir: Path) -> list[tuple[str, Path]]:
    """(label, directory) of every sample-writing stage: the rehearsal data, then the rounds."""
    d = Path(run_dir)
    groups = [("rehearsal", d / "base" / "rehearsal")] if (d / "base" / "rehearsal").is_dir() else []
    rounds = sorted((p for p in d.glob("round-*") if p.is_dir() and _round_no(p) >= 0), key=_round_no)
    return groups + [(p.name, p) for p in rounds]


# --------------------------------------------------------------------------- the sample browser


def browser_data(run_dir: Path, seeds: list[Sample] | None = None, embedder=None) -> dict[str, Any]:
    """The sample browser's data: every sample with its verdict, and what it refers to."""
    groups, samples = [], []
    for label, folder in sample_groups(run_dir):
        kept = _read_group(folder / "samples.jsonl")
        dropped = _read_group(folder / "rejected.jsonl")
        if kept or dropped:
            groups.append(label)
            samples += [(label, True, s) for s in kept] + [(label, False, s) for s in dropped]
    known = _indexed_samples(run_dir)
    if seeds is None:
        seeds = [s for s in known if s.source == "seed"]
    nearest = nearest_seeds([s for _, _, s in samples], seeds, embedder, Path(run_dir) / NEAREST_CACHE)
    wanted = {ref for _, _, s in samples for ref in s.meta.get("examples", [])}
    refs = {}
    for s in list(seeds) + known + [s for _, ok, s in samples if ok]:
        ref = example_ref(s)
        if ref in wanted and ref not in refs:
            refs[ref] = {"p": s.prompt, "r": s.response, "from": _origin(s)}
    rows = [_sample_row(label, ok, s, nearest[i] if nearest else None) for i, (label, ok, s) in enumerate(samples)]
    return {"groups": groups, "samples": rows, "refs": refs, "seeds": [{"p": s.prompt, "r": s.response} for s in seeds],
            "nearest": nearest is not None}


def nearest_seeds(samples: list[Sample], seeds: list[Sample], embedder, cache: Path | None = None
                  ) -> list[tuple[int, float]] | None:
    """(index of the nearest seed, cosine similarity) per sample, in the embedder's space.
    `cache`: a JSON file of earlier answers, so that a page rewritten after every round embeds
    each sample once. Without an embedder: the cached answers if they cover every sample, else None."""
    if not seeds:
        return None
    known = (_read_json(cache) if cache else None) or {}
    if embedder is None:  # what an earlier write found, if that covers every sample
        found = known.get("nearest", {})
        return [tuple(found[example_ref(s)]) for s in samples] if all(example_ref(s) in found for s in samples) else None
    key = hashlib.sha256(json.dumps([embedder.name, [example_ref(s) for s in seeds]]).encode()).hexdigest()
    found: dict[str, list] = known.get("nearest", {}) if known.get("key") == key else {}
    todo = list({example_ref(s): s for s in samples if example_ref(s) not in found}.items())
    if todo:
        sims = embedder.embed_samples([s for _, s in todo]) @ embedder.embed_samples(seeds).T
        for (ref, _), row in zip(todo, sims):
            j = int(row.argmax())
            found[ref] = [j, round(float(row[j]), 4)]
        if cache is not None:
            atomic_write_text(cache, json.dumps({"key": key, "nearest": found}) + "\n")
    return [tuple(found[example_ref(s)]) for s in samples]


def _sample_row(label: str, ok: bool, s: Sample, nearest: tuple[int, float] | None) -> dict[str, Any]:
    row: dict[str, Any] = {"g": label, "ok": ok, "why": s.reject_reason or "", "p": s.prompt, "r": s.response,
                           "sc": s.scores, "ex": list(s.meta.get("examples", []))}
    if s.system:
        row["sys"] = s.system
    if "index" in s.meta:
        row["i"] = s.meta["index"]
    if s.meta.get("rejected_response"):
        row["alt"], row["altwhy"] = s.meta["rejected_response"], s.meta.get("rejected_reason", "")
    if nearest is not None:
        row["seed"], row["sim"] = nearest
    return row


def _read_group(path: Path) -> list[Sample]:
    # read_rejected, not read_samples: it takes an empty file and empty texts alike
    return read_rejected(path) if path.is_file() else []


def _indexed_samples(run_dir: Path) -> list[Sample]:
    """The seeds and samples each round's index/ holds (the pools the in-context examples came from)."""
    out, seen = [], set()
    for _, folder in sample_groups(run_dir):
        sidecar = folder / "index" / "samples.jsonl"
        if sidecar.is_file():
            for s in read_rejected(sidecar):
                if example_ref(s) not in seen:
                    seen.add(example_ref(s))
                    out.append(s)
    return out


def _origin(s: Sample) -> str:
    if s.source == "seed":
        return "seed"
    return "rehearsal" if s.round == 0 else f"round-{s.round}"


def _browser_shell(data: dict[str, Any]) -> str:
    counts = Counter((row["g"], row["ok"]) for row in data["samples"])
    reasons = Counter(row["why"] for row in data["samples"] if not row["ok"])
    rows = "".join(
        f'<tr data-group="{html.escape(g)}"><td>{html.escape(g)}</td><td class="num accepted">{counts[g, True]}</td>'
        f'<td class="num rejected">{counts[g, False]}</td></tr>' for g in data["groups"])
    top = ", ".join(f"{html.escape(r)} {c}" for r, c in reasons.most_common())
    note = "" if data["nearest"] else "<p class=note>Nearest seeds were not computed (no embedder given).</p>"
    return (f'<table id="sample-counts"><tr><th>samples</th><th>accepted</th><th>rejected</th></tr>{rows}</table>'
            f"<p>Reject reasons: {top or 'none'}</p>{note}" + BROWSER_CONTROLS)


# --------------------------------------------------------------------------- the tables


def _header(d: Path, config: dict, best: str | None, finished: bool) -> str:
    facts = [(k, config[k]) for k in ("domain", "model", "rounds", "samples", "rehearsal", "export", "quant") if k in config]
    status = (f"finished: <code>final.gguf</code> is <b>{html.escape(best or '?')}</b>" if finished
              else "in progress (this page is rewritten after every round)")
    items = "".join(f"<li>{html.escape(str(k))}: <code>{html.escape(str(v))}</code></li>" for k, v in facts)
    return (f"<header><h1>localalign run <code>{html.escape(d.resolve().name)}</code></h1><p>{status}</p>"
            f"<ul class=facts>{items}</ul></header>")


def _section(title: str, content: str) -> str:
    return f'<section id="{_slug(title).lower()}"><h2>{html.escape(title)}</h2>{content}</section>'


def _results_table(results: dict[str, dict], best: str | None) -> str:
    if not results:
        return "<p>No evaluation yet.</p>"
    labels = list(results)
    head = "".join(f'<th class="{"chosen" if l == best else ""}" data-label="{html.escape(l)}">{html.escape(l)}'
                   f'{" ★ chosen" if l == best else ""}</th>' for l in labels)
    rows = []
    for suite, metric in _metric_columns(results):
        cells = []
        for label in labels:
            record = results[label]["suites"].get(suite, {}).get("metrics", {}).get(metric)
            cells.append(f'<td class="{"chosen" if label == best else ""}">{_metric_cell(record)}</td>')
        direction = "" if _higher_better(results, suite, metric) else " <small>(lower is better)</small>"
        rows.append(f"<tr><th>{html.escape(suite)} / {html.escape(metric)}{direction}</th>{''.join(cells)}</tr>")
    limited = any(r.get("limited") for r in results.values())
    note = ("<p class=note>Greedy decoding, offline, no judge model. Each cell: value [95% Wilson interval] n=items"
            + ("; some models were scored on the first items of each suite only (eval_limit)." if limited else ".")
            + "</p>")
    return f'<table id="results"><tr><th>suite / metric</th>{head}</tr>{"".join(rows)}</table>{note}'


def _paired_table(results: dict[str, dict], pairs: list[tuple[str, str]]) -> str:
    rows = paired_rows(results, pairs)
    if not rows:
        return "<p>No two models to compare yet.</p>"
    head = "".join(f"<th>{html.escape(h)}</th>" for h in PAIRED_HEADER)
    body = []
    for r in rows:
        verdict = r.row.verdict()
        cells = "".join(f"<td>{html.escape(c)}</td>" for c in paired_cells(r))
        body.append(f'<tr class="{verdict}">{cells}</tr>')
    return f'<table id="paired"><tr>{head}</tr>{"".join(body)}</table><p class=note>{html.escape(PAIRED_NOTE)}</p>'


def _metric_cell(record: dict | None) -> str:
    if not record or not record.get("n"):
        return "-"
    v, lo, hi = record["value"], record["ci_low"], record["ci_high"]
    bar = ""
    if 0 <= lo <= v <= hi <= 1:
        bar = (f'<div class=ci><span style="left:{lo * 100:.1f}%;width:{(hi - lo) * 100:.1f}%"></span>'
               f'<i style="left:{v * 100:.1f}%"></i></div>')
    return f"<b>{v:.3f}</b> <small>[{lo:.2f}, {hi:.2f}] n={record['n']}</small>{bar}"


def _plots(d: Path, results: dict[str, dict]) -> str:
    images = []
    for suite, metric in _metric_columns(results):
        path = d / f"{_slug(suite)}__{_slug(metric)}.png"  # as report.write_report names them
        if path.is_file():
            data = base64.b64encode(path.read_bytes()).decode()
            images.append(f'<img alt="{html.escape(suite)} {html.escape(metric)}" src="data:image/png;base64,{data}">')
    return "".join(images) or "<p>No plots yet.</p>"


def _stage_table(stages: dict[str, dict], results: dict[str, dict]) -> str:
    if not stages:
        return "<p>No stage has finished yet.</p>"
    rows, total = [], 0.0
    for name, stage in stages.items():
        seconds = float(stage.get("seconds", 0.0))
        total += seconds
        info = {k: v for k, v in stage.items() if k not in ("status", "inputs", "outputs", "seconds", "finished_at")}
        what = "; ".join(f"{k} {_short(v)}" for k, v in info.items())
        rows.append(f'<tr data-stage="{html.escape(name)}"><td>{html.escape(name)}</td><td class=num>{_duration(seconds)}</td>'
                    f"<td>{html.escape(_throughput(name, stage, seconds, results))}</td><td>{html.escape(what)}</td></tr>")
    rows.append(f"<tr class=total><td>all stages</td><td class=num>{_duration(total)}</td><td></td><td></td></tr>")
    return f'<table id="stages"><tr><th>stage</th><th>time</th><th>throughput</th><th>recorded</th></tr>{"".join(rows)}</table>'


def _throughput(name: str, stage: dict, seconds: float, results: dict[str, dict]) -> str:
    if seconds <= 0:
        return ""
    if "accepted" in stage:
        decided = stage["accepted"] + stage.get("rejected", 0)
        return f"{decided / seconds * 60:.1f} decided/min ({stage['accepted'] / seconds * 60:.1f} accepted/min)"
    if "tokens_per_s" in stage:
        return f"{stage['tokens_per_s']:.0f} tokens/s"
    if name.endswith("/eval"):
        label = name.split("/")[-2]
        suites = results.get(label, {}).get("suites", {}).values()
        items, tokens = sum(s.get("n_items", 0) for s in suites), sum(s.get("reply_tokens", 0) for s in suites)
        return f"{items / seconds:.2f} items/s" + (f", {tokens / seconds:.0f} reply tokens/s" if tokens else "")
    return ""


def _data_table(d: Path) -> str:
    names = [("accepted", "accepted"), ("rejected", "rejected"), ("refusals", "refusals"),
             ("kind_agreement", "right kind"), ("constraints_met", "constraints met"), ("seed_agreement", "agrees with seed")]
    rows = []
    for label, folder in sample_groups(d):
        report = _read_json(folder / "data-report.json")
        if report is None:
            continue
        cells = []
        for key, _ in names:
            value = report.get(key)
            if isinstance(value, dict):
                value = "n/a" if value.get("value") is None else f"{value['value']:.2f} (n={value.get('n')})"
            cells.append(f"<td>{html.escape('' if value is None else str(value))}</td>")
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(report.get("reasons", {}).items(), key=lambda kv: -kv[1]))
        rows.append(f"<tr><td>{html.escape(label)}</td>{''.join(cells)}<td>{html.escape(reasons)}</td></tr>")
    if not rows:
        return "<p>No data report yet.</p>"
    head = "".join(f"<th>{t}</th>" for _, t in names)
    return (f'<table id="data"><tr><th>samples</th>{head}<th>reject reasons</th></tr>{"".join(rows)}</table>'
            "<p class=note>What each round's accepted pairs teach, against the seeds (isara/data_report.py).</p>")


# --------------------------------------------------------------------------- helpers


def _round_no(p: Path) -> int:
    try:
        return int(p.name.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _read_toml(path: Path) -> dict:
    import tomllib

    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError):
        return {}


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items())
    return str(value)


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 60 else f"{int(seconds // 60)} min {seconds % 60:.0f} s"


def _script_json(data: dict[str, Any]) -> str:
    # Inside <script>, "</script>" or "<!--" in a sample would end or bend the element: escape '<'.
    return json.dumps(data, ensure_ascii=False).replace("<", "\\u003c")


# --------------------------------------------------------------------------- the page

BROWSER_CONTROLS = """
<div id="filters">
  <label>samples <select id="f-group"><option value="">all</option></select></label>
  <label>verdict <select id="f-status"><option value="">all</option><option value="accepted">accepted</option>
    <option value="rejected">rejected</option></select></label>
  <label>reason <select id="f-reason"><option value="">any</option></select></label>
  <label>search <input id="f-q" type="search" placeholder="words in the prompt, response or reason"></label>
  <span id="count" data-shown="0" data-total="0"></span>
</div>
<div id="sample-list"></div>
<button id="more" hidden>show more</button>
"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title><style>{css}</style></head>
<body>
{body}
<script type="application/json" id="run-data">{data}</script>
<script>{script}</script>
</body></html>
"""

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1280px;padding:1em 2em;color:#1d2125}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.8em;border-bottom:1px solid #ddd}
code{font-size:.92em;background:#f3f4f6;padding:0 .2em;border-radius:3px}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #dde1e6;padding:.3em .6em;text-align:left;vertical-align:top}
th{background:#f6f8fa}#stages td:first-child,td.num{white-space:nowrap}td.num{text-align:right}.chosen{background:#fff6d6}th.chosen{background:#ffe9a6}
tr.total td{font-weight:bold}#paired tr.better td{background:#e6f6ea}#paired tr.worse td{background:#fde8e7}.note{color:#57606a;font-size:.9em}ul.facts{display:flex;flex-wrap:wrap;gap:.4em 1.5em;padding:0;list-style:none}
.ci{position:relative;height:6px;background:#eef0f3;margin-top:3px;min-width:110px}
.ci span{position:absolute;top:0;height:6px;background:#9cc3f5}.ci i{position:absolute;top:-2px;width:2px;height:10px;background:#0b4fa8}
img{max-width:100%;margin:.3em .5em .3em 0;border:1px solid #eee}
#filters{display:flex;flex-wrap:wrap;gap:.6em 1.2em;align-items:center;position:sticky;top:0;background:#fff;padding:.5em 0;z-index:1}
#f-q{width:22em}#count{font-weight:bold}
details.sample{border:1px solid #dde1e6;border-radius:4px;margin:.3em 0;padding:.2em .6em}
details.sample[open]{background:#fafbfc}summary{cursor:pointer;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.badge{display:inline-block;border-radius:3px;padding:0 .4em;margin-right:.4em;font-size:.85em}
.badge.accepted{background:#d6f5dd;color:#0f5323}.badge.rejected{background:#fde2e1;color:#8a1c15}.badge.group{background:#eef0f3}
pre{max-height:28em;overflow:auto;white-space:pre-wrap;word-wrap:break-word;background:#fff;border:1px solid #eef0f3;padding:.4em;margin:.2em 0 .6em}
.k{color:#57606a;font-size:.9em;margin-top:.4em}
"""

SCRIPT = r"""
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("run-data").textContent);
  var PAGE = 200, limit = PAGE, openFirst = false;
  var $ = function (id) { return document.getElementById(id); };
  var controls = { group: $("f-group"), status: $("f-status"), reason: $("f-reason"), q: $("f-q") };
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function option(select, value, label) { var o = el("option", "", label); o.value = value; select.appendChild(o); }
  data.groups.forEach(function (g) { option(controls.group, g, g); });
  var reasons = {};
  data.samples.forEach(function (s) { if (!s.ok) reasons[s.why] = (reasons[s.why] || 0) + 1; });
  Object.keys(reasons).sort().forEach(function (r) { option(controls.reason, r, r + " (" + reasons[r] + ")"); });

  function readHash() {
    var h = new URLSearchParams(location.hash.replace(/^#/, ""));
    openFirst = h.get("open") === "first";
    Object.keys(controls).forEach(function (k) {
      var v = h.get(k) || "", c = controls[k];
      if (c.tagName === "SELECT" && !Array.prototype.some.call(c.options, function (o) { return o.value === v; })) v = "";
      c.value = v;
    });
  }
  function writeHash() {
    var h = new URLSearchParams();
    Object.keys(controls).forEach(function (k) { if (controls[k].value) h.set(k, controls[k].value); });
    try { history.replaceState(null, "", "#" + h.toString()); } catch (e) { /* a file: URL that refuses */ }
  }
  function text(s) {
    if (s._hay === undefined) s._hay = [s.p, s.r, s.why, s.alt || "", s.g].join("\n").toLowerCase();
    return s._hay;
  }
  function matches(s, f) {
    if (f.group && s.g !== f.group) return false;
    if (f.status && (f.status === "accepted") !== s.ok) return false;
    if (f.reason && (s.ok || s.why !== f.reason)) return false;
    if (f.q && f.q.split(/\s+/).some(function (w) { return w && text(s).indexOf(w) < 0; })) return false;
    return true;
  }
  function block(parent, label, value) {
    parent.appendChild(el("div", "k", label));
    parent.appendChild(el("pre", "", value));
  }
  function example(parent, label, p, r) {
    var d = el("details"), sm = el("summary", "", label + ": " + p);
    d.appendChild(sm);
    d.addEventListener("toggle", function () {
      if (d.childNodes.length > 1) return;
      block(d, "prompt", p);
      block(d, "response", r);
    });
    parent.appendChild(d);
  }
  function body(d, s) {
    if (s.sys) block(d, "system", s.sys);
    block(d, "prompt", s.p);
    block(d, "response", s.r);
    if (s.alt) block(d, "answer set against it (" + s.altwhy + ")", s.alt);
    var sc = Object.keys(s.sc).map(function (k) { return k + " " + s.sc[k]; }).join(", ");
    d.appendChild(el("div", "k", "scores: " + (sc || "none") + (s.i !== undefined ? "; candidate #" + s.i : "")));
    if (s.seed !== undefined) {
      var seed = data.seeds[s.seed];
      example(d, "nearest seed (cosine " + s.sim.toFixed(3) + ")", seed.p, seed.r);
    }
    d.appendChild(el("div", "k", "in-context examples: " + (s.ex.length ? s.ex.length : "none (the model's own request)")));
    s.ex.forEach(function (ref, n) {
      var x = data.refs[ref];
      if (x) example(d, (n + 1) + ". " + x.from, x.p, x.r);
      else d.appendChild(el("div", "k", (n + 1) + ". " + ref + " (not found in the run)"));
    });
  }
  function row(s) {
    var d = el("details", "sample"), sm = el("summary");
    d.dataset.group = s.g;
    d.dataset.status = s.ok ? "accepted" : "rejected";
    sm.appendChild(el("span", "badge group", s.g));
    sm.appendChild(el("span", "badge " + (s.ok ? "accepted" : "rejected"), s.ok ? "accepted" : s.why));
    sm.appendChild(document.createTextNode(s.p.replace(/\s+/g, " ").slice(0, 160)));
    d.appendChild(sm);
    d.addEventListener("toggle", function () { if (d.childNodes.length === 1) body(d, s); });
    return d;
  }
  function render() {
    var f = { group: controls.group.value, status: controls.status.value, reason: controls.reason.value,
              q: controls.q.value.trim().toLowerCase() };
    var shown = data.samples.filter(function (s) { return matches(s, f); });
    var list = $("sample-list");
    list.textContent = "";
    shown.slice(0, limit).forEach(function (s) { list.appendChild(row(s)); });
    if (openFirst && list.firstChild) { body(list.firstChild, shown[0]); list.firstChild.open = true; }
    var count = $("count");
    count.textContent = shown.length + " of " + data.samples.length + " samples";
    count.dataset.shown = shown.length;
    count.dataset.total = data.samples.length;
    $("more").hidden = shown.length <= limit;
  }
  function changed() { limit = PAGE; openFirst = false; writeHash(); render(); }
  Object.keys(controls).forEach(function (k) { controls[k].addEventListener(k === "q" ? "input" : "change", changed); });
  $("more").addEventListener("click", function () { limit += PAGE; render(); });
  window.addEventListener("hashchange", function () { readHash(); limit = PAGE; render(); });
  readHash();
  render();
})();
"""
