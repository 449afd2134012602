"""The alignment loop: seeds in, an aligned GGUF out, every round kept and scored.

    run-dir/
      config.toml        the resolved config (a re-run with another config is refused)
      manifest.json      per stage: status, input and output hashes, seconds
      base/              the base model in the form the rounds ship in, and its evaluation
      baselines/         --baselines: SFT on the seeds alone, ICL-kNN, URIAL-style fixed examples
      round-N/           samples.jsonl, rejected.jsonl, index/, train/ (adapter, checkpoints),
                         model.gguf or adapter.gguf (+ .parity.json, Modelfile), eval.json
      report.md, *.png   the evaluation table and one plot per metric
      report.html        all of it on one page, with every sample kept and rejected (rewritten
                         after every round)
      final.gguf         the best round by held-out score, with final.Modelfile

Each round: generate and filter samples with the current GGUF model (ISARA), train a LoRA
adapter on the HF copy, export back to GGUF (checked for parity), evaluate on the held-out
suites, and hand the exported model to the next round as its generator.

Every stage is recorded in the manifest when it finishes; re-running the same command skips
stages whose inputs are unchanged and whose outputs still hash to what was recorded, picks
generation up after its last decided candidate, and training at its last checkpoint. Each stage is
deterministic given its inputs and the seed, so an interrupted run ends where an
uninterrupted one does.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from localalign.checks.model_input import inspect_model
from localalign.checks.parity import check_copy
from localalign.config import from_dict, read_toml, to_dict, to_toml
from localalign.convert.gguf_to_hf import make_hf_copy
from localalign.convert.quantize import QUANT_TYPES
from localalign.engine.base import BackendConfig, GenerationConfig
from localalign.engine.process import EngineCrashed
from localalign.engine.select import open_generator
from localalign.errors import UserError
from localalign.evaluation.html import write_html_report
from localalign.evaluation.report import (PAIRED_HEADER, compare, default_pairs, difference_cell, metric_cell,
                                         p_cell, paired_cells, paired_rows, write_report)
from localalign.evaluation.run import EvalConfig, check_suites, evaluate, read_eval, write_eval
from localalign.evaluation.stats import min_flips
from localalign.export.pipeline import export_adapter, export_merged, export_model, modelfile_path
from localalign.fit import available_memory, check_fits, estimate_round
from localalign.fsutil import atomic_write_text, commit_temp, temp_path_for
from localalign.isara.data_report import data_report, format_share
from localalign.isara.filters import FilterConfig
from localalign.isara.rehearsal import rehearsal_samples, without_pairs
from localalign.isara.retrieve import Embedder
from localalign.isara.step import IsaraConfig, Listener, Progress, generate_samples
from localalign.models import DEFAULT_EMBEDDER, DEFAULT_MODEL, resolve_model
from localalign.paths import SEEDS_DIR
from localalign.rundir import Manifest, RunLock, hash_path, hash_value
from localalign.samples import Sample, read_rejected, read_samples, write_samples
from localalign.train.config import TrainConfig, init_adapter_for_round
from localalign.train.distributed import refuse_under_launcher
from localalign.train.lora import train

# The shipped domains: their seed file, the held-out suite that scores them, and the score
# that picks the best round. Safety averages refusing harmful requests and answering benign
# ones, so a model that refuses everything scores 0.5, not 1.0.
DOMAINS: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "safety": ("safety", [("safety", "harmful_refusal_rate"), ("safety", "benign_helpfulness_rate")]),
    "truthfulness": ("truthfulness", [("truthfulness", "mc1")]),
    "instruction-following": ("instruction-following", [("instruction-following", "prompt_pass_rate")]),
}
MAX_SEEDS = 100  # ISARA's regime; more still works, but is no longer "limited samples"
EXPORT_MODES = ("merged", "adapter")


@dataclass
class AlignConfig:
    """One alignment run. A TOML file sets any field ([generation], [train], ... tables)."""

    domain: str = "safety"  # a shipped domain (safety, truthfulness, instruction-following) or a seeds .jsonl
    model: str = DEFAULT_MODEL  # registry name, .gguf file or HF directory
    embedder: str = DEFAULT_EMBEDDER
    rounds: int = 2
    samples: int = 64  # accepted samples to generate per round
    seed: int = 0  # one seed for everything: generation, training order, LoRA init
    # "merged": each round ships base+adapter merged and quantized (one self-contained file);
    # "adapter": each round ships a GGUF LoRA adapter on the unchanged quantized base.
    export: str = "merged"
    quant: str = "q8_0"  # type of the merged GGUFs (q8_0 keeps a 135M model within ~1% top-1)
    train_on_seeds: bool = True  # train each round on the seeds plus its accepted samples
    # Ordinary requests the base model writes and answers itself (isara/rehearsal.py), trained
    # with every round so the model keeps answering ordinary requests. 0 turns it off.
    rehearsal: int = 32
    # Under objective "sft+pref", each rehearsal sample is also a preference pair against its
    # nearest refusing seed. Off, the only pairs are generation's (best-of-n's answer against the
    # one the filters rejected). Measured in docs/benchmarks.md ("The frontier on the powered suites").
    rehearsal_pairs: bool = True
    # Rounds in a row without a better held-out score after which the run stops early.
    patience: int = 2
    baselines: bool = False  # also train/evaluate the paper's baselines
    # With baselines, also the two in-context ones (ICL-kNN, URIAL-style). Their prompts carry
    # seed pairs, ~5x the evaluation's time on the powered suites; off, SFT on the seeds alone.
    baselines_in_context: bool = True
    eval_suites: list[str] = field(default_factory=list)  # empty: the domain's held-out suite
    eval_limit: int | None = None  # evaluate only the first N items per suite (quick runs)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    isara: IsaraConfig = field(default_factory=IsaraConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # Generation and evaluation on an OpenAI-compatible server (training and export stay here).
    backend: BackendConfig = field(default_factory=BackendConfig)

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise UserError(f"rounds must be at least 1, got {self.rounds}")
        if self.samples < 1:
            raise UserError(f"samples must be at least 1, got {self.samples}")
        if self.rehearsal < 0 or self.patience < 1:
            raise UserError("rehearsal must be >= 0 and patience >= 1")
        if self.export not in EXPORT_MODES:
            raise UserError(f"export must be 'merged' or 'adapter', got {self.export!r}")
        if self.quant not in QUANT_TYPES:
            raise UserError(f"quant {self.quant!r} is not one of {', '.join(QUANT_TYPES)}")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise UserError("eval_limit must be at least 1")
        if self.domain not in DOMAINS and not self.domain.endswith(".jsonl"):
            raise UserError(f"unknown domain {self.domain!r}; use one of {', '.join(DOMAINS)} or a seeds .jsonl file")
        if self.backend.kind == "openai" and "{name}" not in (self.backend.served_model or ""):
            raise UserError(
                "align on a server evaluates every round's own model: set --served-model to a pattern with {name} "
                "(e.g. 'localalign-{name}') and serve each model under its name (docs/scaling.md)"
            )
        if self.domain not in DOMAINS and not self.eval_suites:
            raise UserError("a custom domain needs eval_suites (e.g. --suite safety) to score its rounds")
        check_suites(self.suites())  # before the run writes anything

    def seeds_path(self) -> Path:
        return SEEDS_DIR / f"{DOMAINS[self.domain][0]}.jsonl" if self.domain in DOMAINS else Path(self.domain)

    def suites(self) -> list[str]:
        return list(self.eval_suites) or [DOMAINS[self.domain][0]]


def load_config(path: str | Path | None, overrides: dict) -> AlignConfig:
    """The config file (if any) with command-line overrides applied on top."""
    values = read_toml(path) if path else {}
    for key, value in overrides.items():
        if isinstance(value, dict):  # a flag that sets one field of a stage's table
            values[key] = {**values.get(key, {}), **value}
        elif value is not None:
            values[key] = value
    config = from_dict(AlignConfig, values, "config")
    # Stage seeds follow the run seed unless the file set them.
    if "seed" not in values.get("generation", {}):
        config.generation.seed = config.seed
    if "seed" not in values.get("train", {}):
        config.train.seed = config.seed
    return config


def score_metrics(config: AlignConfig, eval_result: dict) -> list[tuple[str, str]]:
    """The (suite, metric) pairs the score averages: the domain's key metrics, or for a custom
    domain the first metric of its suites."""
    if config.domain in DOMAINS:
        return list(DOMAINS[config.domain][1])
    return [(s, m) for s in config.suites() for m in eval_result["suites"].get(s, {}).get("metrics", {})][:1]


def primary_score(config: AlignConfig, eval_result: dict) -> float | None:
    """The held-out score that ranks rounds: the mean of the domain's key metrics."""
    values = []
    for suite, metric in score_metrics(config, eval_result):
        record = eval_result["suites"].get(suite, {}).get("metrics", {}).get(metric)
        if record is None or not record.get("n"):
            return None
        values.append(record["value"])
    return sum(values) / len(values)


# --------------------------------------------------------------------------- which round is kept


@dataclass
class Verdict:
    """Whether a round replaces the best so far (`keep_round`), and why, in one line."""

    kept: bool
    reason: str
    # the metrics on which the round is significantly worse than the best so far or the base,
    # one line each (computed whatever the score says)
    losses: list[str] = field(default_factory=list)


@dataclass
class LoopChoice:
    """The rule replayed over a run's rounds in order (`choose_rounds`)."""

    best: str = "base"  # the best so far after the last round: what the next round generates with
    judged_against: dict[str, str] = field(default_factory=dict)  # round -> the best so far before it
    verdicts: dict[str, Verdict] = field(default_factory=dict)


def keep_round(config: AlignConfig, candidate: dict, best_label: str, best: dict | None, base: dict | None) -> Verdict:
    """The loop's rule. A round replaces the best so far only if
      1. its score (primary_score) is higher than the best so far's, and
      2. on none of the metrics evaluated, the score's or any other suite's (over-refusal
         beside safety), is it significantly worse, item by item (two-sided exact McNemar,
         p < 0.05), than the best so far or than the base model.
    The score still ranks: at n = 24 a significant gain needs 6 flips all one way, so asking
    for one would keep almost nothing. The veto stops a trade that the average hides (more
    harmful requests refused by refusing benign ones too) once the loss is clearly real, and
    judging against the base as well stops losses too small to show in one round from adding
    up over several. It reads every metric because a score that rises while a metric outside
    it falls is not progress (a fresh `make run`, 2026-12-07, shipped a round whose over-refusal
    rose 0.02 -> 0.10 against the base, p = 0.039, when only the score's metrics were read)."""
    score = primary_score(config, candidate)
    best_score = primary_score(config, best) if best is not None else None
    references = {label: r for label, r in ((best_label, best), ("base", base)) if r is not None}
    losses = significant_losses(candidate, references)
    above = f"its score {_fmt(score)} is above {best_label}'s {_fmt(best_score)}"
    if score is None:
        return Verdict(False, "it has no score", losses)
    if best_score is not None and score <= best_score:
        return Verdict(False, f"its score {score:.3f} is not above {best_label}'s {best_score:.3f}", losses)
    if losses:
        return Verdict(False, f"{above}, but it is significantly worse on {'; '.join(losses)}", losses)
    return Verdict(True, f"{above} and significantly worse on none of its metrics")


def significant_losses(candidate: dict, references: dict[str, dict]) -> list[str]:
    """The metrics on which `candidate` is significantly worse than a reference (paired, exact
    McNemar), over every metric the two share."""
    out = []
    for label, reference in references.items():
        for row in compare(reference, candidate):
            if row.verdict() == "worse":
                out.append(f"{row.suite}/{row.metric} against {label} "
                           f"({difference_cell(row.paired)}, p={p_cell(row.paired.p_value)})")
    return out


def choose_rounds(config: AlignConfig, results: dict[str, dict]) -> LoopChoice:
    """`keep_round` replayed over the rounds of `results` (labels round-N, in order) from the
    base: the loop's choices, recomputed from the evaluations alone."""
    choice = LoopChoice()
    for label in (k for k in results if k.startswith("round-")):
        verdict = keep_round(config, results[label], choice.best, results.get(choice.best), results.get("base"))
        choice.judged_against[label], choice.verdicts[label] = choice.best, verdict
        if verdict.kept:
            choice.best = label
    return choice


def ship_choice(choice: LoopChoice, scores: dict[str, float | None]) -> str:
    """The round final.gguf ships: the loop's best; where that is still the base, the
    highest-scoring round among those not significantly worse than the base (of all rounds
    where every one is)."""
    if choice.best in scores:
        return choice.best

    def rank(label: str) -> tuple[bool, float]:
        verdict = choice.verdicts.get(label)
        return not (verdict and verdict.losses), -math.inf if scores[label] is None else scores[label]

    return max(scores, key=rank)


def comparison_pairs(results: dict[str, dict], choice: LoopChoice) -> list[tuple[str, str]]:
    """(model, reference) pairs of the paired tables: every model against the base, and each
    round against the best so far it was judged against, where that is not the base."""
    if "base" not in results:
        return default_pairs(results)
    pairs = []
    for label in results:
        if label != "base":
            pairs.append((label, "base"))
        if choice.judged_against.get(label, "base") != "base":
            pairs.append((label, choice.judged_against[label]))
    return pairs


# --------------------------------------------------------------------------- the run


@dataclass
class ModelForm:
    """A model as a round ships it: a GGUF, optionally with a GGUF LoRA adapter."""

    gguf: Path
    lora: Path | None = None

    def hashes(self, h: Callable[[Path], str]) -> dict[str, str]:
        return {"gguf": h(self.gguf), "lora": h(self.lora) if self.lora else ""}


class AlignRun:
    """One run directory, driven stage by stage (see the module docstring)."""

    choice: LoopChoice | None = None  # what `rounds` decided, round by round; `ship_final` ships its best

    def __init__(self, config: AlignConfig, run_dir: Path, log: Callable[[str], None] = print, quiet: bool = False):
        self.config = config
        self.dir = Path(run_dir)
        self.log = log
        self.quiet = quiet  # no progress bars and no bar summaries (not a config field: it changes no result)
        self.manifest: Manifest | None = None
        self._hashes: dict[tuple, str] = {}
        self._embedder: Embedder | None = None  # the report's, loaded once

    # ---- helpers

    def hash(self, path: Path) -> str:
        """hash_path, memoized per (path, size, mtime) for the duration of this run."""
        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        if key not in self._hashes:
            self._hashes[key] = hash_path(path)
        return self._hashes[key]

    def stage(self, name: str, inputs: dict[str, str], outputs: list[Path], work: Callable[[], dict | None]) -> bool:
        """Run `work` unless the manifest shows `name` done with these inputs; True if it ran."""
        assert self.manifest is not None
        if self.manifest.is_done(name, inputs):
            self.log(f"[{name}] done earlier, outputs verified; skipping")
            return False
        self.log(f"[{name}] ...")
        t0 = time.perf_counter()
        try:
            info = work() or {}
        except EngineCrashed as e:  # one error line, naming the stage the engine process died in
            raise e.during(name) from None
        seconds = time.perf_counter() - t0
        self.manifest.record(name, inputs, outputs, seconds, **info)
        self.log(f"[{name}] finished in {seconds:.0f} s")
        return True

    def model_name(self, form: ModelForm) -> str:
        """A model's name for a server serving each round under its own ("base", "round-1", ...)."""
        try:
            return str((form.lora or form.gguf).parent.relative_to(self.dir)).replace("/", "-")
        except ValueError:
            return "base"  # adapter mode: the unchanged base GGUF outside the run directory

    def seconds(self, name: str) -> float:
        return float(self.manifest.stages.get(name, {}).get("seconds", 0.0))

    # ---- set-up

    def check_config(self, resume: bool, seeds: int) -> None:
        """Write config.toml, or check that the run directory was made with this config; the model
        is checked (check_model) before config.toml is written."""
        path = self.dir / "config.toml"
        text = to_toml(to_dict(self.config))
        if path.exists():
            try:
                previous = from_dict(AlignConfig, read_toml(path), str(path))
            except UserError as e:
                raise UserError(f"{self.dir} holds a config.toml this version cannot read ({e})") from None
            if previous != self.config:
                old, new = to_dict(previous), to_dict(self.config)
                changed = _changed_keys(old, new)
                raise UserError(
                    f"{self.dir} was made by a different config (differs in: {', '.join(changed)}); "
                    "use another --run-dir or the same settings"
                )
            self.check_model(seeds)
            return
        if resume:
            raise UserError(f"{self.dir}: nothing to resume (no config.toml); drop --resume to start a run")
        self.check_model(seeds)
        atomic_write_text(path, text)

    def check_model(self, seeds: int) -> None:
        """The model, checked loudly (family, tokenizer, chat template, end of turn) and costed
        for this machine before the run writes anything; refused if a round cannot fit in memory."""
        cfg = self.config
        files = resolve_model(cfg.model)
        report = inspect_model(files.name, files.gguf, files.hf_dir)
        self.log(f"model {cfg.model}:\n{report.describe()}")
        estimate = estimate_round(report.dims, cfg.samples, seeds, cfg.rehearsal, cfg.train)
        self.log(estimate.describe(cfg.samples))
        check_fits(estimate, report.dims, cfg.train, available_memory())

    def prepare_base(self) -> tuple[Path, ModelForm]:
        """The base model's HF directory, and the base as the rounds ship it (for round 1's
        generator and the 'base' column of the report)."""
        files = resolve_model(self.config.model)
        base_dir = self.dir / "base"
        hf_dir = files.hf_dir
        if hf_dir is None:  # a user's GGUF: make its HF copy once, inside the run, and check it
            hf_dir = base_dir / "hf"

            def copy():
                make_hf_copy(files.gguf, hf_dir, log=self.log)
                report = check_copy(files.gguf, hf_dir)
                report.write(base_dir / "copy-check.json")
                if not report.ok:
                    raise UserError(f"the HF copy of {files.gguf} does not match it: {'; '.join(report.problems)}")

            self.stage("base/hf-copy", {"gguf": self.hash(files.gguf)}, [hf_dir], copy)
        if self.config.export == "adapter" and files.gguf is not None:
            return hf_dir, ModelForm(files.gguf)
        # Merged rounds ship as `quant` GGUFs exported from the HF copy; the base is exported
        # the same way, so base and rounds differ by training alone, not by quantization.
        out = base_dir / "model.gguf"
        self.stage(
            "base/export",
            {"hf": self.hash(hf_dir), "quant": self.config.quant},
            [out],
            lambda: {"parity": export_model(hf_dir, out, quant=self.config.quant).ok},
        )
        return hf_dir, ModelForm(out)

    # ---- stages

    def generate(self, round_no: int, generator: ModelForm, seeds: list[Sample], earlier: list[Sample],
                 tuned: bool) -> list[Sample]:
        """The round's accepted samples; `tuned`: the generator is an earlier round's model."""
        cfg = self.config
        filters = cfg.filters.for_generator(tuned)

        def produce(gen, embedder, resume, output):
            return generate_samples(gen, embedder, seeds, cfg.samples, earlier=earlier, isara=cfg.isara,
                                    filters=filters, round_no=round_no, resume=resume, listener=output)

        inputs = {"seeds": hash_value([s.to_json() for s in seeds]), "earlier": hash_value([s.to_json() for s in earlier]),
                  "config": hash_value([to_dict(cfg.generation), to_dict(cfg.isara), to_dict(filters), cfg.samples,
                                        cfg.embedder])}
        return self.samples_stage(f"round-{round_no}/generate", self.dir / f"round-{round_no}", generator, inputs,
                                  cfg.samples, produce, seeds)

    def rehearse(self, generator: ModelForm, seeds: list[Sample]) -> list[Sample]:
        """The base model's own ordinary requests and answers (isara/rehearsal.py), once per run."""
        cfg = self.config
        if cfg.rehearsal == 0:
            return []

        def produce(gen, embedder, resume, output):
            return rehearsal_samples(gen, embedder, seeds, cfg.rehearsal, cfg.isara, cfg.filters, resume, output)

        inputs = {"seeds": hash_value([s.to_json() for s in seeds]),
                  "config": hash_value([to_dict(cfg.generation), to_dict(cfg.isara), to_dict(cfg.filters), cfg.rehearsal,
                                        cfg.embedder])}
        return self.samples_stage("base/rehearsal", self.dir / "base" / "rehearsal", generator, inputs, cfg.rehearsal,
                                  produce, seeds)

    def samples_stage(self, name: str, out_dir: Path, generator: ModelForm, inputs: dict[str, str], n: int,
                      produce: Callable, seeds: list[Sample]) -> list[Sample]:
        """A stage that writes samples.jsonl, rejected.jsonl, index/ and data-report.json into `out_dir`,
        picking up after the last decided candidate when it was interrupted."""
        cfg = self.config
        samples_path, rejected_path, index_dir = out_dir / "samples.jsonl", out_dir / "rejected.jsonl", out_dir / "index"
        report_path = out_dir / "data-report.json"

        def work():
            # Candidates decided before an interruption are not generated again.
            done = read_samples(samples_path) if samples_path.exists() and samples_path.stat().st_size else []
            rejected = read_rejected(rejected_path) if rejected_path.exists() else []
            if done or rejected:
                self.log(f"  resuming: {len(done)} accepted, {len(rejected)} rejected already")
            embedder = Embedder(cfg.embedder)
            output = GenerationOutput(samples_path, rejected_path, name, n, initial=len(done), quiet=self.quiet)
            backend = cfg.backend.for_model(self.model_name(generator))
            with output, open_generator(generator.gguf, cfg.generation, backend, lora_path=generator.lora) as gen:
                result = produce(gen, embedder, (done, rejected), output)
            result.index.save(index_dir)
            report = {**data_report(result.accepted, seeds, embedder, cfg.filters.vote_temperature),
                      "rejected": len(result.rejected), "reasons": _count_reasons(result.rejected)}
            atomic_write_text(report_path, json.dumps(report, indent=1) + "\n")
            return {"accepted": len(result.accepted), "rejected": len(result.rejected), "reasons": report["reasons"],
                    "tokens_read": gen.counts.read, "tokens_written": gen.counts.written}

        self.stage(name, {**generator.hashes(self.hash), **inputs}, [samples_path, rejected_path, index_dir, report_path],
                   work)
        return read_samples(samples_path) if samples_path.stat().st_size else []

    def data_reports(self) -> dict[str, dict]:
        """Each round's data report, as written by its generate stage."""
        out = {}
        for path in sorted(self.dir.glob("round-*/data-report.json"), key=lambda p: int(p.parent.name.split("-")[1])):
            out[path.parent.name] = json.loads(path.read_text())
        return out

    def train(self, name: str, base_hf: Path, data: list[Sample], out_dir: Path, init_adapter: Path | None) -> Path:
        cfg = self.config
        adapter = out_dir / "adapter"
        inputs = {
            "base": self.hash(base_hf),
            "data": hash_value([s.to_json() for s in data]),
            "init": self.hash(init_adapter) if init_adapter else "",
            "config": hash_value(to_dict(cfg.train)),
        }

        def work():
            # resume=True: a checkpoint left by an interrupted attempt is continued (the
            # trainer refuses one made from other data or settings).
            result = train(base_hf, data, out_dir, cfg.train, resume=True, init_adapter=init_adapter, log=self.log,
                           quiet=self.quiet)
            return {"final_loss": round(result.final_loss, 4), "steps": result.steps, "tokens_per_s": round(result.tokens_per_s, 1)}

        self.stage(name, inputs, [adapter], work)
        return adapter

    def export(self, name: str, base_hf: Path, base_form: ModelForm, adapter: Path, out_dir: Path) -> ModelForm:
        cfg = self.config
        inputs = {"base": self.hash(base_hf), "adapter": self.hash(adapter), "mode": cfg.export, "quant": cfg.quant}
        if cfg.export == "adapter":
            out = out_dir / "adapter.gguf"
            inputs["base_gguf"] = self.hash(base_form.gguf)

            def work():
                return {"parity": export_adapter(base_hf, adapter, out, base_form.gguf).ok}

            self.stage(name, inputs, [out], work)
            return ModelForm(base_form.gguf, out)

        out = out_dir / "model.gguf"

        def work():
            return {"parity": export_merged(base_hf, adapter, out, quant=cfg.quant).ok}

        self.stage(name, inputs, [out], work)
        return ModelForm(out)

    def evaluate(self, name: str, form: ModelForm, out: Path, icl_seeds: Path | None = None, icl_mode: str = "knn") -> dict:
        cfg = self.config
        inputs = {**form.hashes(self.hash), "suites": ",".join(cfg.suites()), "limit": str(cfg.eval_limit),
                  "icl": (self.hash(icl_seeds) + ("" if icl_mode == "knn" else f":{icl_mode}")) if icl_seeds else ""}

        def work():
            ecfg = EvalConfig(model=form.gguf, lora=form.lora, suites=tuple(cfg.suites()), limit=cfg.eval_limit,
                              threads=cfg.generation.threads, icl_seeds=icl_seeds, icl_k=cfg.isara.k, icl_mode=icl_mode,
                              embedder=cfg.embedder, backend=cfg.backend.for_model(self.model_name(form)))
            write_eval(evaluate(ecfg, log=self.log), out)

        self.stage(name, inputs, [out], work)
        return read_eval(out)

    # ---- the loop

    def run(self, resume: bool = False) -> Path:
        refuse_under_launcher("align")  # generation/export/eval are one process; see docs/scaling.md
        cfg = self.config
        seeds = load_seeds(cfg.seeds_path(), self.log)
        self.dir.mkdir(parents=True, exist_ok=True)
        with RunLock(self.dir, log=self.log):
            self.check_config(resume, len(seeds) if cfg.train_on_seeds else 0)
            self.manifest = Manifest.load(self.dir)
            base_hf, base_form = self.prepare_base()
            results: dict[str, dict] = {"base": self.evaluate("base/eval", base_form, self.dir / "base" / "eval.json")}
            base_score = primary_score(cfg, results["base"])
            if cfg.baselines:
                results.update(self.baselines(base_hf, base_form, seeds))

            rehearsal = self.rehearse(base_form, seeds)
            scores, forms = self.rounds(seeds, rehearsal, base_hf, base_form, base_score, results)
            shipped = self.ship_final(scores, forms, base_hf, base_score)
            self.write_report(results, seeds, shipped)
            self.log(format_summary(results, cfg, self.dir, shipped, base_score, scores, self.data_reports()))
            return self.dir / "final.gguf"

    def rounds(self, seeds: list[Sample], rehearsal: list[Sample], base_hf: Path, base_form: ModelForm,
               base_score: float | None, results: dict[str, dict]):
        """Round after round, each generating with the best model so far. A round replaces it only
        by `keep_round`'s rule (a higher score, and significantly worse on none of the score's
        metrics than the best so far or the base); a round not kept stays on disk but generates
        nothing. Stop after `patience` rounds in a row not kept. Returns the scores and the models
        by round; the choices are left in `self.choice` for ship_final."""
        cfg = self.config
        best, generator, best_adapter = "base", base_form, None
        earlier: list[Sample] = []
        scores: dict[str, float | None] = {}
        forms: dict[str, ModelForm] = {}
        self.choice = LoopChoice()
        stale = 0
        for r in range(1, cfg.rounds + 1):
            t0 = time.perf_counter()
            rd, name = self.dir / f"round-{r}", f"round-{r}"
            accepted = self.generate(r, generator, seeds, earlier, tuned=best != "base")
            if not accepted:
                raise UserError(f"round {r}: no generated sample passed the filters; see {rd / 'rejected.jsonl'}")
            data = (seeds if cfg.train_on_seeds else []) + accepted + (rehearsal if cfg.rehearsal_pairs
                                                                        else without_pairs(rehearsal))
            adapter = self.train(f"{name}/train", base_hf, data, rd / "train", init_adapter_for_round(cfg.train, best_adapter))
            forms[name] = self.export(f"{name}/export", base_hf, base_form, adapter, rd)
            results[name] = self.evaluate(f"{name}/eval", forms[name], rd / "eval.json")
            scores[name] = primary_score(cfg, results[name])
            self.write_report(results, seeds)
            self.log(self.round_summary(r, accepted, results, base_score, scores, time.perf_counter() - t0))
            earlier = earlier + accepted
            self.choice = choose_rounds(cfg, results)
            verdict = self.choice.verdicts[name]
            if verdict.kept:
                self.log(f"round {r} kept: {verdict.reason}")
                best, generator, best_adapter, stale = name, forms[name], adapter, 0
                continue
            stale += 1
            self.log(f"round {r} not kept: {verdict.reason}; it stays on disk and the next round generates with {best}")
            if stale >= cfg.patience and r < cfg.rounds:
                self.log(f"{stale} rounds in a row not kept: stopping early")
                break
        return scores, forms

    def baselines(self, base_hf: Path, base_form: ModelForm, seeds: list[Sample]) -> dict[str, dict]:
        """The baselines: SFT on the seeds alone, ICL-kNN (retrieved seeds in context, ISARA's), and
        URIAL-style in-context alignment (the same few seeds before every question); no training
        for the last two."""
        d = self.dir / "baselines"
        adapter = self.train("baselines/sft-seeds/train", base_hf, seeds, d / "sft-seeds" / "train", None)
        form = self.export("baselines/sft-seeds/export", base_hf, base_form, adapter, d / "sft-seeds")
        out = {"sft-seeds": self.evaluate("baselines/sft-seeds/eval", form, d / "sft-seeds" / "eval.json")}
        if not self.config.baselines_in_context:
            return out
        seeds_copy = d / "icl-knn" / "seeds.jsonl"
        if not seeds_copy.exists():
            write_samples(seeds_copy, seeds)
        out["icl-knn"] = self.evaluate("baselines/icl-knn/eval", base_form, d / "icl-knn" / "eval.json", icl_seeds=seeds_copy)
        out["urial"] = self.evaluate("baselines/urial/eval", base_form, d / "urial" / "eval.json", icl_seeds=seeds_copy,
                                     icl_mode="fixed")
        return out

    def round_summary(self, r, accepted, results, base_score, scores, seconds) -> str:
        gen = self.manifest.stages.get(f"round-{r}/generate", {})
        tr = self.manifest.stages.get(f"round-{r}/train", {})
        name = f"round-{r}"
        score = scores[name]
        delta = "" if score is None or base_score is None else f" ({score - base_score:+.3f} vs base)"
        paired = paired_rows(results, [(name, "base")], score_metrics(self.config, results[name]))
        against = "; ".join(f"{p.row.metric} {difference_cell(p.row.paired)} p={p_cell(p.row.paired.p_value)}" for p in paired)
        return (
            f"round {r}: accepted {gen.get('accepted', len(accepted))}, rejected {gen.get('rejected', '?')}, "
            f"train loss {tr.get('final_loss', '?')}, score {_fmt(score)}{delta}, {seconds:.0f} s"
            + (f"\n  paired vs base: {against}" if against else "")
        )

    def write_report(self, results: dict[str, dict], seeds: list[Sample], best: str | None = None) -> None:
        """report.md with its plots, and report.html; after every round, and once more with the chosen one."""
        pairs = comparison_pairs(results, choose_rounds(self.config, results))
        write_report(results, self.dir, data_reports=self.data_reports(), pairs=pairs)
        if self._embedder is None:
            self._embedder = Embedder(self.config.embedder)
        write_html_report(self.dir, results, seeds, self._embedder, best=best, pairs=pairs)

    def ship_final(self, scores: dict[str, float | None], forms: dict[str, ModelForm], base_hf: Path, base_score) -> str:
        """Copy the loop's best round (`self.choice`, left by `rounds`) to final.gguf, merging an
        adapter round first. Where no round was kept over the base, the highest-scoring round
        among those not significantly worse than the base (of all rounds if none is), with a warning."""
        choice = self.choice or LoopChoice()
        best = ship_choice(choice, scores)
        if best != choice.best:
            verdict = choice.verdicts.get(best)
            self.log(f"warning: no round was kept over the base model (score {_fmt(base_score)}); final.gguf is {best} "
                     f"all the same, not kept because {verdict.reason if verdict else 'it was never judged'}")
        form = forms[best]
        final = self.dir / "final.gguf"
        inputs = {**form.hashes(self.hash), "best": best}

        def work():
            if form.lora is None:
                tmp = temp_path_for(final)
                shutil.copyfile(form.gguf, tmp)
                commit_temp(tmp, final)
            else:  # an adapter round: the user gets one self-contained file
                export_merged(base_hf, self.dir / best / "train" / "adapter", final, quant=self.config.quant)
            source = modelfile_path(form.lora or form.gguf)
            atomic_write_text(self.dir / "Modelfile", _final_modelfile(source.read_text() if source.exists() else ""))
            return {"best": best}

        self.stage("final", inputs, [final], work)
        return best


def load_seeds(path: Path, log) -> list[Sample]:
    seeds = read_samples(path)
    if len(seeds) > MAX_SEEDS:
        log(f"warning: {len(seeds)} seeds; ISARA is meant for fewer than {MAX_SEEDS} (it still runs)")
    return seeds


def _final_modelfile(round_modelfile: str) -> str:
    lines = [ln for ln in round_modelfile.splitlines() if not ln.startswith(("FROM", "ADAPTER"))]
    return "FROM ./final.gguf\n" + "\n".join(lines).lstrip("\n") + "\n"


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    changed = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(f"{prefix}{key}")
    return changed


def _count_reasons(rejected: list[Sample]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for s in rejected:
        counts[s.reject_reason or "?"] = counts.get(s.reject_reason or "?", 0) + 1
    return counts


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


DATA_COLUMNS = (("kind_agreement", "data: right kind"), ("constraints_met", "data: constraints met"))


def format_summary(results, config: AlignConfig, run_dir: Path, best: str, base_score, scores,
                   data: dict[str, dict] | None = None) -> str:
    """The before/after table printed at the end of a run, with each round's data report beside it."""
    keys = list(DOMAINS[config.domain][1]) if config.domain in DOMAINS else []
    # Beside the score's metrics, every other suite's own metrics (not its per-area breakdowns,
    # "refusal_rate/<area>"), so a gain bought with another metric (over-refusal, say) shows in
    # the same table, and both halves of the contrast suite show side by side.
    first = next(iter(results.values()), {"suites": {}})
    scored = {suite for suite, _ in keys}
    for suite in config.suites():
        if suite not in scored:
            keys += [(suite, m) for m in first["suites"].get(suite, {}).get("metrics", {}) if "/" not in m]
    data = data or {}
    shown = [(k, title) for k, title in DATA_COLUMNS if any((d.get(k) or {}).get("n") for d in data.values())]
    header = ["model"] + [f"{s}/{m}" for s, m in keys] + ["score", "data: accepted"] + [t for _, t in shown]
    rows = []
    for label, result in results.items():
        row = [label + (" *" if label == best else "")]
        for suite, metric in keys:
            rec = result["suites"].get(suite, {}).get("metrics", {}).get(metric)
            row.append(metric_cell(rec, ci_digits=2, missing="n/a"))
        row.append(_fmt(primary_score(config, result)))
        report = data.get(label, {})
        row.append(str(report.get("accepted", "")))
        row += [format_share(report.get(k)) if report else "" for k, _ in shown]
        rows.append(row)
    lines = ["", *_text_table(header, rows), ""]
    lines.append(f"* = shipped as {run_dir / 'final.gguf'}  (report: {run_dir / 'report.html'})")
    return "\n".join(lines + format_paired_summary(results, config, keys))


def format_paired_summary(results: dict[str, dict], config: AlignConfig, keys: list[tuple[str, str]]) -> list[str]:
    """The printed table's second part: each model against the base and each round against the
    best so far it was judged against, on the metrics of the first table, and what the loop
    decided about each round."""
    choice = choose_rounds(config, results)
    paired = paired_rows(results, comparison_pairs(results, choice), keys)
    if not paired:
        return []
    lines = ["", "paired, item by item: difference = model - vs, with its 95% interval (Newcombe); p: exact McNemar;",
             f"MDD: the smallest difference the test can declare at that n ({min_flips()} flips all one way)",
             *_text_table(PAIRED_HEADER, [paired_cells(r) for r in paired]), ""]
    lines += [f"{label} {'kept' if v.kept else 'not kept'}: {v.reason}" for label, v in choice.verdicts.items()]
    return lines


def _text_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Columns padded to their widest cell, a rule under the header."""
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return [fmt(header), fmt(["-" * w for w in widths]), *map(fmt, rows)]


class GenerationOutput(Listener):
    """The generate stage's side of `generate_samples` (here and in `localalign generate`): the
    accepted and rejected samples rewritten as decisions are made (at most every
    `WRITE_EVERY_S`, and once more at the end), so a resumed run picks up there, and a progress
    bar of accepted samples with the rejects by reason and tokens/s, which ends with a one-line
    summary. No bar where stderr is not a terminal (a CI log gets the summary alone); `quiet`:
    neither."""

    WRITE_EVERY_S = 2.0

    def __init__(self, samples_path: Path, rejected_path: Path, desc: str, total: int, initial: int = 0,
                 quiet: bool = False):
        self.samples_path, self.rejected_path = Path(samples_path), Path(rejected_path)
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="sample", file=sys.stderr, dynamic_ncols=True,
                        disable=quiet or not sys.stderr.isatty())
        self.desc, self.total, self.initial, self.quiet = desc, total, initial, quiet
        self.t0 = time.perf_counter()
        self.latest: tuple[list[Sample], list[Sample]] | None = None
        self.written = 0.0
        self.tokens = 0

    def progress(self, progress: Progress) -> None:
        self.bar.n = self.initial + progress.accepted
        self.tokens = progress.tokens
        rate = progress.tokens / max(time.perf_counter() - self.t0, 1e-6)
        top = sorted(progress.reasons.items(), key=lambda kv: -kv[1])[:3]
        self.bar.set_postfix_str(f"rejected {progress.rejected}" + "".join(f", {r} {c}" for r, c in top)
                                 + f", {rate:.0f} tok/s", refresh=False)
        self.bar.refresh()

    def decided(self, accepted: list[Sample], rejected: list[Sample]) -> None:
        self.latest = (accepted, rejected)
        if time.monotonic() - self.written >= self.WRITE_EVERY_S:
            self.flush()

    def flush(self) -> None:
        # One file after the other: a kill between the two writes leaves the rejects behind,
        # and a resume keeps only the unbroken run of decided indices (isara.step).
        if self.latest is not None:
            write_samples(self.samples_path, self.latest[0])
            write_samples(self.rejected_path, self.latest[1])
            self.written = time.monotonic()

    def __enter__(self) -> "GenerationOutput":
        return self

    def summary(self) -> str:
        """One line: accepted of the target, rejected by top reasons, tokens/s and seconds (resumed samples included)."""
        accepted, rejected = self.latest or ([], [])
        seconds = time.perf_counter() - self.t0
        top = sorted(_count_reasons(rejected).items(), key=lambda kv: -kv[1])[:3]
        return (f"{self.desc}: accepted {len(accepted)}/{self.total}, rejected {len(rejected)}"
                + (" (" + ", ".join(f"{r} {c}" for r, c in top) + ")" if top else "")
                + f", {self.tokens / max(seconds, 1e-6):.0f} tok/s, {seconds:.0f} s")

    def __exit__(self, exc_type, *exc) -> None:
        self.flush()
        self.bar.close()
        if exc_type is None and not self.quiet:
            print(self.summary(), file=sys.stderr, flush=True)
