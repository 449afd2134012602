"""report.html of the tiny end-to-end run, opened in headless Chromium: the tables and the sample
browser's counts agree with manifest.json and the JSONL files, a filter set in the URL fragment
narrows the list as the script reads it, a sample unfolds with its nearest seed and in-context
examples, and a screenshot is saved. Skipped where Chromium is not installed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (.ci/run installs Debian's: "
                                                "apt-get install -y chromium)"),
]


def chromium(tmp_path: Path, *args: str) -> str:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           f"--user-data-dir={tmp_path / 'profile'}", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def count(dom: str) -> tuple[int, int]:
    m = re.search(r'id="count" data-shown="(\d+)" data-total="(\d+)"', dom)
    assert m, "no sample count in the page"
    return int(m.group(1)), int(m.group(2))


def lines(path: Path) -> int:
    return sum(1 for line in open(path) if line.strip()) if path.exists() else 0


def test_report_in_a_browser(installed_tiny_run, tmp_path):
    run_dir, _ = installed_tiny_run
    url = (run_dir / "report.html").resolve().as_uri()
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    groups = {"rehearsal": run_dir / "base" / "rehearsal", "round-1": run_dir / "round-1", "round-2": run_dir / "round-2"}
    accepted = {g: lines(d / "samples.jsonl") for g, d in groups.items()}
    rejected = {g: lines(d / "rejected.jsonl") for g, d in groups.items()}
    total = sum(accepted.values()) + sum(rejected.values())

    dom = chromium(tmp_path, "--dump-dom", url)
    # the round table: base and every round, the chosen one marked as the manifest says
    labels = re.findall(r'<th class="(chosen)?" data-label="([^"]+)"', dom)
    assert [label for _, label in labels] == ["base", "round-1", "round-2"]
    assert [label for chosen, label in labels if chosen] == [stages["final"]["best"]]
    # every stage of the manifest, with its time
    assert re.findall(r'<tr data-stage="([^"]+)">', dom) == list(stages)
    # per group: the counts the page shows, the files and the manifest agree
    for g in groups:
        row = re.search(rf'<tr data-group="{g}"><td>{g}</td><td class="num accepted">(\d+)</td>'
                        rf'<td class="num rejected">(\d+)</td>', dom)
        assert row and (int(row.group(1)), int(row.group(2))) == (accepted[g], rejected[g])
        stage = stages["base/rehearsal" if g == "rehearsal" else f"{g}/generate"]
        assert (stage["accepted"], stage["rejected"]) == (accepted[g], rejected[g])
    # the sample browser, as its script rendered it
    assert count(dom) == (total, total)
    assert dom.count('<details class="sample"') == total

    dom = chromium(tmp_path, "--dump-dom", url + "#status=rejected")
    assert count(dom) == (sum(rejected.values()), total)
    assert 'data-status="accepted"' not in dom
    dom = chromium(tmp_path, "--dump-dom", url + "#group=round-1&status=accepted")
    assert count(dom)[0] == stages["round-1/generate"]["accepted"]
    reason, n = max(stages["round-1/generate"]["reasons"].items(), key=lambda kv: kv[1])
    assert count(chromium(tmp_path, "--dump-dom", url + f"#group=round-1&reason={reason}"))[0] == n
    word = json.loads(open(groups["round-2"] / "samples.jsonl").readline())["prompt"].split()[0]
    assert 1 <= count(chromium(tmp_path, "--dump-dom", url + f"#q={word}"))[0] <= total

    dom = chromium(tmp_path, "--dump-dom", url + "#group=round-2&status=accepted&open=first")
    assert "nearest seed (cosine" in dom and "in-context examples: 2" in dom and "1. seed" in dom

    shot = tmp_path / "report.png"
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2200", url + "#group=round-1&open=first")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
