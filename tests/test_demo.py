"""`make demo` stays true: examples/demo.yml, run as the Makefile runs it (tiny model, `tunefile train`, then
`tunefile inference`), learns its chat set and answers. The run happens in a copy of the paths the demo
uses, so the repository's own demo-out/ is left alone."""

from __future__ import annotations

import shutil
from pathlib import Path

from runtime_bundles import REPO, metrics, run_tunefile


def test_the_demo_trains_and_answers(tmp_path: Path) -> None:
    (tmp_path / "examples" / "data").mkdir(parents=True)
    shutil.copy(REPO / "examples" / "demo.yml", tmp_path / "examples" / "demo.yml")
    shutil.copy(REPO / "examples" / "data" / "colours.jsonl", tmp_path / "examples" / "data" / "colours.jsonl")

    for step in (["tiny-model", "demo-out/tiny-model"], ["train", "examples/demo.yml"],
                 ["verify", "demo-out/outputs/bundle"]):
        result = run_tunefile(*step, cwd=tmp_path, timeout=600)
        assert result.returncode == 0, f"tunefile {' '.join(step)}:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"

    losses = [record["loss"] for record in metrics(tmp_path / "demo-out" / "outputs") if "loss" in record]
    assert losses[-1] < losses[0] / 10
    answer = run_tunefile("inference", "examples/demo.yml", "--prompt", "Say red.", "--max-new-tokens", "8",
                      cwd=tmp_path)
    assert answer.returncode == 0, answer.stderr[-3000:]
    assert answer.stdout.strip() == "RED"
