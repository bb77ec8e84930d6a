"""Damaged weights are one line naming the file (issue 14): safetensors reports a truncated or garbled file as its own
SafetensorError, which is not an OSError and once escaped as a traceback, from the base model and from an adapter
that training continues."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from test_runtime_model_options import lora_plan  # a LoraPlan from the real compiler

from tunefile.runtime.model import ModelLoadError, add_adapter, from_pretrained


def truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def garbled(path: Path) -> None:
    path.write_bytes(b"\xff" * 64)


@pytest.mark.parametrize("damage", [truncated, garbled])
def test_a_damaged_base_model_is_one_line_naming_the_file(tmp_path: Path, tiny_model_dir: Path, damage) -> None:
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    damage(model_dir / "model.safetensors")
    with pytest.raises(ModelLoadError) as raised:
        from_pretrained(str(model_dir))
    message = str(raised.value)
    assert "\n" not in message and raised.value.exit_code == 2
    assert message.startswith(f"base_model {model_dir}: {model_dir / 'model.safetensors'} does not read (Error while "
                              "deserializing header"), message
    assert message.endswith("a truncated or damaged file; download or copy it again")


def test_a_damaged_adapter_to_continue_is_one_line_naming_the_file(tmp_path: Path, tiny_model_dir: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapter_dir = tmp_path / "adapter"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter_dir)
    truncated(adapter_dir / "adapter_model.safetensors")
    lora = dataclasses.replace(lora_plan(lora_target_modules=["q_proj"]), model_dir=str(adapter_dir))
    with pytest.raises(ModelLoadError) as raised:
        add_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), lora)
    assert str(raised.value).startswith(f"lora_model_dir {adapter_dir}: {adapter_dir / 'adapter_model.safetensors'} "
                                        "does not read ("), str(raised.value)
