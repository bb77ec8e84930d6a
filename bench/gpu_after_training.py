"""After training, on whatever this machine has (the lent GPU, or the CPU as a dry run): the demo's fine-tune,
then `tunefile merge-lora`, `tunefile inference` (a --prompt, stdin, and a repeat that must match) and the
`--gradio` chat page, asked through Gradio's own client the way the page's JavaScript asks it.

    python bench/gpu_after_training.py --results bench/results/gpu_after_training.json

Runs from the repository root (examples/demo.yml's paths start there) and leaves demo-out/ behind, as
`make demo` does. Each step's command, exit code, wall time and what it printed that matters go into the
results; the table at the end is the short version.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from gpu_runs import PATH, TUNEFILE, device_name  # this folder: how the GPU runs start tunefile

CONFIG = "examples/demo.yml"
ENV = {**os.environ, "PATH": PATH, "PYTHONUNBUFFERED": "1", "GRADIO_ANALYTICS_ENABLED": "False"}


def step(name: str, args: list[str], *, stdin: str | None = None, timeout: float = 300) -> dict[str, Any]:
    start = time.perf_counter()
    done = subprocess.run([*TUNEFILE, *args], input=stdin, capture_output=True, text=True, env=ENV, timeout=timeout)
    record = {"step": name, "command": "tunefile " + " ".join(args), "exit_code": done.returncode,
              "wall_s": round(time.perf_counter() - start, 1), "stdout": done.stdout.strip()[-400:],
              "stderr_tail": done.stderr.strip().splitlines()[-6:]}
    print(f"== {name}: exit {done.returncode} in {record['wall_s']} s\n{done.stdout[-400:]}", flush=True)
    return record


def wait_for_page(url: str, process: subprocess.Popen, timeout: float = 120) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if process.poll() is not None:
            raise RuntimeError(f"the chat page's server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return time.perf_counter() - start
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {timeout:.0f} s")


def chat_page(port: int, prompt: str, log: Path) -> dict[str, Any]:
    """Start `inference --gradio`, wait for the page, send one message through gradio_client, stop it."""
    url = f"http://127.0.0.1:{port}/"
    with log.open("w", encoding="utf-8") as out:
        server = subprocess.Popen([*TUNEFILE, "inference", CONFIG, "--gradio", "--port", str(port)], stdout=out,
                                  stderr=subprocess.STDOUT, env=ENV, start_new_session=True)
    record: dict[str, Any] = {"step": "gradio", "command": f"tunefile inference {CONFIG} --gradio --port {port}"}
    try:
        record["page_ready_s"] = round(wait_for_page(url, server), 1)
        with urllib.request.urlopen(url, timeout=10) as response:
            record["page_has_title"] = "tunefile" in response.read().decode("utf-8", "replace").lower()
        from gradio_client import Client

        start = time.perf_counter()
        reply = Client(url, verbose=False).predict(prompt, api_name="/respond")  # named after the page's function
        record |= {"prompt": prompt, "reply": str(reply)[:200], "reply_s": round(time.perf_counter() - start, 2),
                   "ok": bool(str(reply).strip())}
    except Exception as error:  # recorded, not raised: the other steps' results still count
        record |= {"ok": False, "error": f"{type(error).__name__}: {error}"}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    record["server_log_tail"] = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-8:]
    print(f"== gradio: {json.dumps({k: v for k, v in record.items() if k != 'server_log_tail'})}", flush=True)
    return record


def trained_run(output_dir: Path) -> dict[str, Any]:
    """What the bundle resolved (device, precision, packing attention) and how the loss went."""
    import yaml

    bundle_config = output_dir / "bundle" / "config.yaml"
    if not bundle_config.exists():
        return {}
    resolved = yaml.safe_load(bundle_config.read_text(encoding="utf-8"))["resolved"]
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in records if "loss" in r]
    summary = json.loads((output_dir / "train_summary.json").read_text())
    return {**{k: resolved[k] for k in ("device", "precision", "attn_implementation", "packing_attention")},
            "steps": summary["step"], "loss_first": round(losses[0], 4), "loss_last": round(losses[-1], 4),
            "eval_loss": next((round(r["eval_loss"], 4) for r in reversed(records) if "eval_loss" in r), None),
            "peak_memory_gib": summary.get("peak_memory_gib")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--port", type=int, default=7871)
    args = parser.parse_args()
    subprocess.run(["rm", "-rf", "demo-out"], check=True)
    steps = [step("tiny-model", ["tiny-model", "demo-out/tiny-model"]),
             step("train", ["train", CONFIG])]
    trained = trained_run(Path("demo-out/outputs"))
    steps += [
        step("merge-lora", ["merge-lora", CONFIG]),
        step("inference --prompt", ["inference", CONFIG, "--prompt", "Say red.", "--max-new-tokens", "8"]),
        step("inference --prompt (again)", ["inference", CONFIG, "--prompt", "Say red.", "--max-new-tokens", "8"]),
        step("inference from stdin", ["inference", CONFIG, "--max-new-tokens", "8"], stdin="Say blue.\nSay green.\n"),
    ]
    merged = sorted(p.name for p in Path("demo-out/outputs/merged").glob("*"))
    steps[2]["files"] = merged
    steps.append(chat_page(args.port, "Say green.", Path("demo-out/gradio.log")))
    first, again = steps[3]["stdout"], steps[4]["stdout"]
    result = {
        "device": device_name(),
        "train": trained,
        "repeat_matches": bool(first) and first == again,
        "steps": steps,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"\n{'step':28} {'exit':>4} {'wall s':>7}  output")
    for record in steps:
        shown = record.get("stdout", record.get("reply", record.get("error", "")))
        code = record.get("exit_code", 0 if record.get("ok") else 1)
        print(f"{record['step']:28} {code!s:>4} {record.get('wall_s', record.get('reply_s', '-'))!s:>7}  "
              f"{' | '.join(str(shown).splitlines())[:70]}")
    print(f"device {result['device']}; train {result['train']}; same reply twice: {result['repeat_matches']}")
    return 0 if all(r.get("exit_code", 0) == 0 for r in steps) and steps[-1].get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
