"""Progress that moves and then sums up: the generation and training bars end with one line;
no bar where stderr is not a terminal (pytest's captured stderr is not one); --quiet silences
both, on align, generate and train."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from localalign.align import GenerationOutput
from localalign.cli import main
from localalign.isara.step import Progress
from localalign.samples import Sample, read_rejected
from localalign.train.config import TrainConfig
from localalign.train.lora import progress_bar, train, train_summary


def _decide(output: GenerationOutput) -> None:
    accepted = [Sample(f"q{i}", f"a{i}", "generated", 1) for i in range(3)]
    rejected = [Sample("q", "", "generated", 1, reject_reason=r) for r in ("empty_response", "empty_response", "not_novel")]
    output.progress(Progress(accepted=3, rejected=3, tokens=1200, reasons={"empty_response": 2, "not_novel": 1}))
    output.decided(accepted, rejected)


def test_generation_ends_with_a_summary_line_and_draws_no_bar_off_a_terminal(tmp_path, capsys):
    with GenerationOutput(tmp_path / "s.jsonl", tmp_path / "r.jsonl", "round-1/generate", 4) as output:
        _decide(output)
    err = capsys.readouterr().err
    assert "\r" not in err and "sample/s" not in err  # no tqdm bar
    (line,) = err.strip().splitlines()
    assert line.startswith("round-1/generate: accepted 3/4, rejected 3 (empty_response 2, not_novel 1), ")
    assert line.endswith(" s") and "tok/s" in line
    assert len(read_rejected(tmp_path / "r.jsonl")) == 3  # the files are still written


def test_quiet_generation_prints_nothing(tmp_path, capsys):
    with GenerationOutput(tmp_path / "s.jsonl", tmp_path / "r.jsonl", "generate", 4, quiet=True) as output:
        _decide(output)
    assert capsys.readouterr().err == ""


def test_no_summary_after_an_interruption(tmp_path, capsys):
    with pytest.raises(KeyboardInterrupt):
        with GenerationOutput(tmp_path / "s.jsonl", tmp_path / "r.jsonl", "generate", 4) as output:
            _decide(output)
            raise KeyboardInterrupt
    assert capsys.readouterr().err == ""
    assert (tmp_path / "s.jsonl").exists()  # what was decided is kept


def test_training_bar_is_off_where_stderr_is_not_a_terminal():
    assert progress_bar(True, 10, 0).disable
    assert train_summary({"step": 12, "losses": [2.0, 1.2345], "tokens": 6000, "seconds": 4.0}, 12) == \
        "train: 12/12 steps, final loss 1.2345, 1500 tokens/s, 4 s"
    assert "final loss n/a" in train_summary({"step": 0, "losses": [], "tokens": 0, "seconds": 0.0}, 3)


@pytest.mark.parametrize("quiet", [False, True])
def test_training_logs_its_summary_unless_quiet(tiny_hf_dir, tmp_path, quiet):
    lines: list[str] = []
    config = TrainConfig(epochs=1, batch_size=2, grad_accum=1, threads=1, cpu_bf16=False, progress=True)
    samples = [Sample(f"What is {i} plus {i}?", f"It is {2 * i}.") for i in range(4)]
    res = train(tiny_hf_dir, samples, tmp_path, config, log=lines.append, quiet=quiet)
    summaries = [m for m in lines if m.startswith("train: ")]
    if quiet:
        assert summaries == []
    else:
        assert summaries == [f"train: 2/2 steps, final loss {res.final_loss:.4f}, {res.tokens_per_s:.0f} tokens/s, "
                             f"{res.seconds:.0f} s"]


@pytest.mark.parametrize("command", ["align", "generate", "train"])
def test_quiet_is_an_option_of_the_long_commands(command):
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0 and "--quiet" in result.output
