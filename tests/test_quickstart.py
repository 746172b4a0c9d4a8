"""The quickstart end to end on a slice of the corpus: every stage, the report, resume and determinism."""

import json
import os
import re
import subprocess
import sys

import pytest


def quickstart(out, *extra):
    return subprocess.run(
        [sys.executable, "-m", "r1kit.cli", "quickstart", "--small", "--out", str(out), *extra],
        capture_output=True, text=True, timeout=600, env={**os.environ, "R1KIT_NO_PROGRESS": "1"},
    )  # fmt: skip


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """One quickstart run that both tests read (it is the suite's slowest single step)."""
    out = tmp_path_factory.mktemp("quickstart") / "a"
    run = quickstart(out)
    assert run.returncode == 0, run.stderr[-3000:]
    run.out = out
    return run


def test_quickstart_runs_every_stage_resumes_and_reproduces(first, tmp_path):
    a = first.out
    state = json.loads((a / "state.json").read_text())["done"]
    assert list(state) == ["prepare", "train", "quantize", "evaluate", "generate", "report"]
    train = state["train"]["result"]
    assert train["val_ppl"] < train["unigram_ppl"] / 3, "the model must be measurably learning"
    ppl = {name: r["ppl"] for name, r in state["evaluate"]["result"].items()}
    assert ppl["gptq"] < ppl["fp32"] * 1.2 and ppl["rtn"] < ppl["fp32"] * 1.2
    page = (a / "report.html").read_text()
    images = re.findall(r'<img src="([^"]+)"', page)
    assert {"loss.png", "sparsity.png", "perplexity.png", "lengths.png"} <= set(images)
    assert all((a / name).stat().st_size > 1000 for name in images)
    assert "unigram baseline" in first.stdout and "report:" in first.stdout

    # interrupted after evaluating: the re-run skips what finished and redoes the rest
    state_file = a / "state.json"
    raw = json.loads(state_file.read_text())
    for stage in ("generate", "report"):
        del raw["done"][stage]
    state_file.write_text(json.dumps(raw))
    (a / "report.html").unlink()
    again = quickstart(a)
    assert again.returncode == 0, again.stderr[-3000:]
    assert all(f"{stage}: done earlier, skipped" in again.stdout for stage in ("prepare", "train", "quantize", "evaluate"))
    assert "[5/6] generate ..." in again.stdout and (a / "report.html").is_file()

    # the same seed gives the same shards and the same first-step losses
    second = quickstart(tmp_path / "b", "--until", "train")
    assert second.returncode == 0, second.stderr[-3000:]
    assert list(json.loads((tmp_path / "b" / "state.json").read_text())["done"]) == ["prepare", "train"]
    for name in sorted(p.name for p in (a / "data" / "shards").iterdir()):
        assert (a / "data" / "shards" / name).read_bytes() == (tmp_path / "b" / "data" / "shards" / name).read_bytes()
    losses = [[json.loads(line)["loss"] for line in (run / "train" / "metrics.jsonl").read_text().splitlines()[:3]] for run in (a, tmp_path / "b")]
    assert losses[0] == losses[1]


def test_report_renders_with_its_plots_in_headless_chromium(first, tmp_path):
    """Render report.html in a real browser: the plots must load (coloured curves), not broken-image icons."""
    import shutil

    import matplotlib.image

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (.ci/run installs it)")
    shots = {}
    for name in ("report", "broken"):
        page = first.out / "report.html"
        if name == "broken":  # the same page with every image path broken: what a failed load looks like
            page = first.out / "broken.html"
            page.write_text((first.out / "report.html").read_text().replace('src="', 'src="missing-'))
        shot = tmp_path / f"{name}.png"
        subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
             "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,2400", page.as_uri()],
            capture_output=True, timeout=120,
        )  # fmt: skip
        pixels = matplotlib.image.imread(shot)[..., :3]
        coloured = (pixels.max(-1) - pixels.min(-1)) > 0.25  # saturated pixels: the plots' blue/orange curves
        shots[name] = coloured.mean()
    assert shots["report"] > 0.002 and shots["report"] > 5 * shots["broken"], shots
