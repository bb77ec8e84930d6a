"""Every golden deepspeed.json is accepted by DeepSpeed's own config parser, with the batch
arithmetic the bundle promises (DeepSpeed installs on the CPU; .ci/run installs it)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import yaml

from helpers import GOLDEN, REPO

PARSE = r"""
import json, os, sys
import deepspeed
from deepspeed.runtime.config import DeepSpeedConfig

os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29511")
deepspeed.init_distributed(dist_backend="gloo", verbose=False)


class DataParallel:  # the bundle's world size, as DeepSpeed would see it across the job
    def __init__(self, size):
        self.size = size

    def get_data_parallel_world_size(self):
        return self.size


results = {}
for path, world_size in json.loads(sys.argv[1]):
    config = DeepSpeedConfig(json.load(open(path)), mpu=DataParallel(world_size))
    results[path] = [config.train_batch_size, config.train_micro_batch_size_per_gpu,
                     config.gradient_accumulation_steps, config.zero_optimization_stage, config.bfloat16_config.enabled]
print(json.dumps(results))
"""


def test_golden_deepspeed_configs_parse_in_deepspeed() -> None:
    if importlib.util.find_spec("deepspeed") is None:  # find, don't import: importing it takes seconds
        if os.environ.get("CI") == "true":
            pytest.fail("deepspeed is not installed (make install adds it)")
        pytest.skip("deepspeed is not installed")
    cases = []
    for path in sorted(GOLDEN.glob("*/deepspeed.json")):
        manifest = json.loads((path.parent / "manifest.json").read_text())
        assert "deepspeed" in manifest["required_packages"]
        world_size = yaml.safe_load((path.parent / "config.yaml").read_text())["distribution"]["world_size"]
        cases.append((str(path), world_size))
    assert len(cases) >= 4
    result = subprocess.run([sys.executable, "-c", PARSE, json.dumps(cases)], capture_output=True, text=True,
                            cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    parsed = json.loads(result.stdout.strip().splitlines()[-1])
    for path, world_size in cases:
        config = json.loads(open(path).read())
        batch, micro, accumulation, stage, bf16 = parsed[path]
        assert batch == micro * accumulation * world_size == config["train_batch_size"]
        assert stage == config["zero_optimization"]["stage"] and bf16 == config["bf16"]["enabled"]
