"""`tunefile merge-lora`: the merged model computes what base + adapter computed, for LoRA and QLoRA configs,
with resized and shrunk vocabularies, from a saved adapter or a checkpoint; mistakes get one clear line.

Most tests build the adapter in-process with peft (random A and B, so it really changes the logits) and merge
in-process; one trains for real and merges through the installed CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from helpers import run_cli
from runtime_bundles import build_tiny_model, compile_bundle, launch, workspace, write_config
from runtime_bundles import run_tunefile as tunefile
from tunefile.runtime import merge
from tunefile.runtime.merge import run_merge
from tunefile.runtime.model import ModelLoadError

ADDED_TOKENS = ["<|tool|>", "<|result|>"]
SAMPLE_TEXT = "Add the two numbers. 25 + 49 = 74"


def make_adapter(base_dir: Path, out_dir: Path, *, added_tokens: list[str] = (), modules_to_save: Any = None,
                 save_tokenizer: bool = True) -> Any:
    """A LoRA adapter on every linear layer with random weights, saved the way training saves it (resized
    embeddings included when tokens were added); returns the in-memory PeftModel (fp32, eval)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if added_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": list(added_tokens)},
                                     replace_extra_special_tokens=False)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if len(tokenizer) > base.get_input_embeddings().num_embeddings:
        base.resize_token_embeddings(len(tokenizer))
    torch.manual_seed(1)
    # init_lora_weights=False: B is random too, not zero, so the adapter changes the outputs.
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                            init_lora_weights=False, modules_to_save=modules_to_save))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "modules_to_save" in name:  # trained-in-full copies: make them differ from the base's
                param.add_(0.05 * torch.randn_like(param))
    model.save_pretrained(out_dir)
    if save_tokenizer:
        tokenizer.save_pretrained(out_dir)
    return model.eval()


def compiled_config(root: Path, base_dir: Path, *, target: str | None = "cpu", **values: Any) -> Path:
    """A config beside `out/`, compiled in-process; returns the bundle's config.yaml."""
    config = {"base_model": str(base_dir), "datasets": [{"path": "data.jsonl", "type": "alpaca"}],
              "output_dir": "out", **values}
    (root / "cfg.yml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    flags = ["--target", target] if target else []
    code, _, err = run_cli("compile", str(root / "cfg.yml"), "--output", str(root / "bundle"), "--force", *flags)
    assert code == 0, err
    return root / "bundle" / "config.yaml"


def logits(model: Any, tokenizer: Any, extra_ids: list[int] = ()) -> torch.Tensor:
    ids = tokenizer(SAMPLE_TEXT).input_ids + list(extra_ids)
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits


def load_merged(directory: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return (AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(directory))


@pytest.mark.parametrize("adapter", ["lora", "qlora"])
def test_merged_logits_equal_base_plus_adapter(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                               adapter: str) -> None:
    peft_model = make_adapter(tiny_model_dir, tmp_path / "out", added_tokens=ADDED_TOKENS,
                              modules_to_save=["embed_tokens"])
    # qlora compiles for a GPU (4-bit needs CUDA) but merges on the CPU here, into unquantised weights.
    config = compiled_config(tmp_path, tiny_model_dir, adapter=adapter, target="cpu" if adapter == "lora" else None,
                             special_tokens={"additional_special_tokens": ADDED_TOKENS})
    monkeypatch.chdir(tmp_path)
    assert run_merge(config) == 0

    merged, tokenizer = load_merged(tmp_path / "out" / "merged")
    assert len(tokenizer) == 1024 + len(ADDED_TOKENS)
    assert merged.get_input_embeddings().num_embeddings == len(tokenizer)
    assert not hasattr(merged, "peft_config") and "quantization_config" not in merged.config.to_dict()
    added_ids = tokenizer.convert_tokens_to_ids(ADDED_TOKENS)
    expected = logits(peft_model, tokenizer, added_ids)
    with peft_model.disable_adapter():
        base_only = logits(peft_model, tokenizer, added_ids)
    assert (expected - base_only).abs().max() > 1e-2  # the adapter matters, so equality below means something
    torch.testing.assert_close(logits(merged, tokenizer, added_ids), expected, atol=1e-4, rtol=0)


def test_large_models_are_written_in_shards(tmp_path: Path, tiny_model_dir: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    peft_model = make_adapter(tiny_model_dir, tmp_path / "out")
    config = compiled_config(tmp_path, tiny_model_dir, adapter="lora")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(merge, "MAX_SHARD_SIZE", "200KB")  # the tiny model is ~600 KB
    assert run_merge(config, output="merged-small-shards") == 0

    target = tmp_path / "merged-small-shards"
    index = json.loads((target / "model.safetensors.index.json").read_text(encoding="utf-8"))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((target / shard).is_file() for shard in shards)
    merged, tokenizer = load_merged(target)
    torch.testing.assert_close(logits(merged, tokenizer), logits(peft_model, tokenizer), atol=1e-4, rtol=0)


@pytest.mark.parametrize("shrink", [True, False])
def test_shrink_embeddings_trims_a_padded_vocabulary(tmp_path: Path, tiny_model_dir: Path,
                                                     monkeypatch: pytest.MonkeyPatch, shrink: bool) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # A base whose embedding matrix is padded past its tokenizer (as Qwen's and many others' are).
    padded = tmp_path / "padded-base"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    base.resize_token_embeddings(1024 + 64, mean_resizing=False)
    base.save_pretrained(padded)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(padded)
    peft_model = make_adapter(padded, tmp_path / "out")
    config = compiled_config(tmp_path, padded, adapter="lora", shrink_embeddings=shrink)
    monkeypatch.chdir(tmp_path)
    assert run_merge(config) == 0

    merged, tokenizer = load_merged(tmp_path / "out" / "merged")
    rows = merged.get_input_embeddings().num_embeddings
    assert rows == (len(tokenizer) if shrink else 1024 + 64)
    assert merged.config.vocab_size == rows and merged.get_output_embeddings().weight.shape[0] == rows
    # Shrinking drops rows no token uses; the logits of real tokens are unchanged.
    torch.testing.assert_close(logits(merged, tokenizer), logits(peft_model, tokenizer)[..., :rows], atol=1e-4, rtol=0)



def test_resized_adapter_on_an_original_size_base_explains_the_size_mismatch(tmp_path: Path,
                                                                             tiny_model_dir: Path) -> None:
    # Trained with two added tokens, but the merge config has no special_tokens and the adapter folder no
    # tokenizer: Axolotl's "size mismatch when merging".
    make_adapter(tiny_model_dir, tmp_path / "out", added_tokens=ADDED_TOKENS, save_tokenizer=False)
    compiled_config(tmp_path, tiny_model_dir, adapter="lora")
    result = tunefile("merge-lora", "cfg.yml", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    message = [line for line in result.stderr.splitlines() if line.startswith("tunefile runtime:")]
    assert len(message) == 1, result.stderr[-3000:]
    assert "size mismatch" in message[0] and "1026" in message[0] and "1024" in message[0]
    assert "special_tokens" in message[0] and "adapter_model.safetensors" in message[0]
    assert not (tmp_path / "out" / "merged").exists()


def test_train_then_merge_the_final_adapter_and_a_checkpoint(tmp_path: Path, tiny_model_dir: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    root = workspace(tmp_path, build_tiny_model(tiny_model_dir))
    write_config(root, adapter="lora", lora_target_linear=True, max_steps=2, save_steps=2,
                 special_tokens={"additional_special_tokens": ["<|tool|>"]},
                 lora_modules_to_save=["embed_tokens", "lm_head"])
    launch(compile_bundle(root / "cfg.yml"))
    assert (root / "out" / "checkpoint-2" / "model.safetensors").is_file()

    final = tunefile("merge-lora", "cfg.yml", cwd=root)
    assert final.returncode == 0, final.stderr[-3000:]
    assert "out/merged" in final.stdout
    monkeypatch.chdir(root)  # in-process from here: the CLI path is covered above
    assert run_merge(root / "bundle" / "config.yaml", lora_dir="out/checkpoint-2", output="merged-step2") == 0

    # The last checkpoint and the final adapter are the same weights, so they merge to the same model.
    from_final = load_file(str(root / "out" / "merged" / "model.safetensors"))
    from_checkpoint = load_file(str(root / "merged-step2" / "model.safetensors"))
    assert from_final.keys() == from_checkpoint.keys()
    for key in from_final:
        torch.testing.assert_close(from_final[key], from_checkpoint[key], atol=1e-6, rtol=0)

    merged, tokenizer = load_merged(root / "out" / "merged")
    assert "<|tool|>" in tokenizer.get_vocab() and tokenizer.chat_template
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    base.resize_token_embeddings(len(tokenizer), mean_resizing=False)  # the adapter brings the rows
    adapted = PeftModel.from_pretrained(base, root / "out").eval()
    extra = tokenizer.convert_tokens_to_ids(["<|tool|>"])
    torch.testing.assert_close(logits(merged, tokenizer, extra), logits(adapted, tokenizer, extra), atol=1e-4, rtol=0)


def test_mistakes_are_one_line_user_errors(tmp_path: Path, tiny_model_dir: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Each is a ModelLoadError (a RuntimeUserError: the entry point prints it as one line and exits 2)."""
    monkeypatch.chdir(tmp_path)
    full = compiled_config(tmp_path, tiny_model_dir)  # no adapter: a full fine-tune
    with pytest.raises(ModelLoadError, match="no `adapter:`"):
        run_merge(full)

    lora = compiled_config(tmp_path, tiny_model_dir, adapter="lora")
    with pytest.raises(ModelLoadError, match="out: no such directory"):
        run_merge(lora)  # nothing trained yet
    with pytest.raises(ModelLoadError, match="elsewhere: no such directory"):
        run_merge(lora, lora_dir="elsewhere")

    make_adapter(tiny_model_dir, tmp_path / "out")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me\n", encoding="utf-8")
    with pytest.raises(ModelLoadError, match="notes: exists and is not a merged model"):
        run_merge(lora, output="notes")
    assert (tmp_path / "notes" / "todo.txt").exists()
    with pytest.raises(ModelLoadError, match="adapter folder itself") as failure:
        run_merge(lora, output="out")
    assert "\n" not in str(failure.value)


def test_a_full_disk_is_one_line_and_leaves_nothing(tmp_path: Path, tiny_model_dir: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """As the GPU machine's disk filled during an 8B merge: safetensors raises its own error type (no OSError)
    part-way through the shards. The user gets the reason and the space needed; no partial folder stays."""
    from safetensors import SafetensorError
    from transformers import PreTrainedModel

    monkeypatch.chdir(tmp_path)
    lora = compiled_config(tmp_path, tiny_model_dir, adapter="lora")
    make_adapter(tiny_model_dir, tmp_path / "out")

    def disk_fills(self: Any, directory: str, **_: Any) -> None:
        (Path(directory) / "model-00001-of-00002.safetensors").write_bytes(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", disk_fills)
    with pytest.raises(ModelLoadError) as failure:
        run_merge(lora)
    message = str(failure.value)
    assert "\n" not in message
    assert message.startswith("cannot write the merged model to out/merged: Error while serializing: I/O error: No "
                              "space left on device (os error 28); it needs about "), message
    assert message.endswith(" MiB free there (--output picks another place)"), message
    assert not (tmp_path / "out" / "merged").exists() and not (tmp_path / "out" / ".merged.tmp").exists()
