"""Tiled MLP (runtime/tiled_mlp.py) and FP8 training (runtime/fp8.py) on the tiny model, on the CPU.

Tiled MLP: the logits and every parameter gradient with tiling equal those without it (fp32), with the model's own
MLP and the generic gated one, under gradient checkpointing (reentrant and not), under LoRA (dropout included), in
two-process DDP and FSDP2 runs (gloo), and through DeepSpeed's TiledMLP; the default slice count is
ceil(sequence / 32768) per batch, as Axolotl; mixture-of-experts blocks are left alone.

FP8: the layer filter picks the linear layers Axolotl's accelerate filter converts (not the first and last linear
layers, not routers, only dimensions that are multiples of 16) and leaves the LoRA matrices and quantised layers
alone; accelerate's own fp8 path converts exactly those layers; a machine that cannot run float8 falls back to bf16
with the reason recorded. torchao's module swap and even its float8 matmul run on the CPU; only the speed needs an
Ada/Hopper GPU (bench/gpu_fp8.py measures it there).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers import require_module
from tunefile.runtime import fp8, tiled_mlp
from tunefile.runtime.tiled_mlp import TiledMlpReport, apply_tiled_mlp, default_shards
from tunefile.schemas.run_plan import DeepSpeedPlan, DistributionPlan, Fp8Plan, FsdpPlan, TiledMlpPlan

SINGLE = DistributionPlan(strategy="single", device="cpu", num_nodes=1, processes_per_node=1, world_size=1)
TOLERANCE = {"atol": 1e-5, "rtol": 1e-5}


LOADED: dict[Path, torch.nn.Module] = {}


def load(model_dir: Path) -> torch.nn.Module:
    """A fresh copy of the model in ``model_dir`` in fp32, in training mode (loaded once, then deep-copied)."""
    import copy

    from transformers import AutoModelForCausalLM

    if model_dir not in LOADED:
        LOADED[model_dir] = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = copy.deepcopy(LOADED[model_dir])
    model.train()
    return model


def token_batch(rows: int = 2, length: int = 25, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 1000, (rows, length), generator=torch.Generator().manual_seed(seed))


def logits_and_grads(model: torch.nn.Module, ids: torch.Tensor, *, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """The model's logits for ``ids`` and the gradient of every trainable parameter for a loss of all of them."""
    torch.manual_seed(seed)  # dropout masks, where there is dropout
    logits = model(input_ids=ids, use_cache=False).logits
    logits.pow(2).mean().backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def assert_same(got: tuple[torch.Tensor, dict], want: tuple[torch.Tensor, dict]) -> None:
    torch.testing.assert_close(got[0], want[0], **TOLERANCE)
    assert got[1].keys() == want[1].keys() and got[1]
    for name in want[1]:
        torch.testing.assert_close(got[1][name], want[1][name], **TOLERANCE, msg=f"gradient of {name}")


def tiled_plan(num_shards: int | None = 3, *, use_original_mlp: bool = True) -> TiledMlpPlan:
    return TiledMlpPlan(num_shards=num_shards, use_original_mlp=use_original_mlp)


def slices_run(model: torch.nn.Module) -> list[int]:
    """Forward-hook counters on every decoder MLP's gate_proj: how many slices each MLP ran in a forward pass."""
    counts = [0] * len(model.model.layers)

    def count(i: int):
        def hook(*_: Any) -> None:
            counts[i] += 1
        return hook

    for i, layer in enumerate(model.model.layers):
        layer.mlp.gate_proj.register_forward_hook(count(i))
    return counts


# --- tiled MLP: exactness -----------------------------------------------------------------------------------

@pytest.mark.parametrize("use_original_mlp", [True, False])
def test_tiled_mlp_gives_the_untiled_logits_and_gradients(tiny_model_dir: Path, use_original_mlp: bool) -> None:
    ids = token_batch()
    want = logits_and_grads(load(tiny_model_dir), ids)
    model = load(tiny_model_dir)
    report = apply_tiled_mlp(model, tiled_plan(3, use_original_mlp=use_original_mlp), distribution=SINGLE)
    assert report.tiled == ("model.layers.0.mlp", "model.layers.1.mlp")
    counts = slices_run(model)
    assert_same(logits_and_grads(model, ids), want)
    # Three slices in forward, each run again in backward: 6 runs of each MLP per step.
    assert counts == [6, 6]
    assert report.record() == {"tiled_mlp": {"layers": 2, "implementation": "tunefile TiledMlp", "num_shards": 3,
                                             "mlp": "the model's own" if use_original_mlp else "generic gated"}}


def test_the_default_slice_count_is_axolotls_per_batch(tiny_model_dir: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    assert [default_shards(n) for n in (1, 32768, 32769, 100_000)] == [1, 1, 2, 4]
    monkeypatch.setattr(tiled_mlp, "TOKENS_PER_SHARD", 64)  # the tiny model's sequences, in several slices
    model = load(tiny_model_dir)
    apply_tiled_mlp(model, tiled_plan(None), distribution=SINGLE)
    assert model.config.hidden_size == 64
    counts = slices_run(model)
    with torch.no_grad():  # forward only: one run per slice
        for length, slices in ((150, 3), (64, 1), (200, 4)):
            counts[:] = [0, 0]
            model(input_ids=token_batch(length=length), use_cache=False)
            assert counts == [slices, slices], length
    ids = token_batch(length=150)
    want = logits_and_grads(load(tiny_model_dir), ids)
    assert_same(logits_and_grads(model, ids), want)
    assert apply_tiled_mlp(load(tiny_model_dir), tiled_plan(None), distribution=SINGLE).record()["tiled_mlp"][
        "num_shards"] == "ceil(sequence length / 32768)"


@pytest.mark.parametrize("reentrant", [True, False])
def test_tiled_mlp_under_gradient_checkpointing(tiny_model_dir: Path, reentrant: bool) -> None:
    from tunefile.runtime.model import enable_gradient_checkpointing

    ids = token_batch()
    want = logits_and_grads(load(tiny_model_dir), ids)
    model = load(tiny_model_dir)
    enable_gradient_checkpointing(model, {"use_reentrant": reentrant}, frozen_inputs=False)
    apply_tiled_mlp(model, tiled_plan(4), distribution=SINGLE)
    counts = slices_run(model)
    assert_same(logits_and_grads(model, ids), want)
    # Forward, the checkpoint's recomputation of the layer, and the tiled backward's own: 3 × 4 slices.
    assert counts == [12, 12]


def lora_model(model_dir: Path, dropout: float) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)  # the adapter's initialisation
    model = get_peft_model(load(model_dir), LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout,
                                                       target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    for name, param in model.named_parameters():  # B starts at zero: make the adapter's gradients all non-trivial
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02, generator=torch.Generator().manual_seed(len(name)))
    return model


def test_tiled_mlp_with_lora_inside_the_mlp(tiny_model_dir: Path) -> None:
    ids = token_batch()
    want = logits_and_grads(lora_model(tiny_model_dir, 0.0), ids)
    model = lora_model(tiny_model_dir, 0.0)
    report = apply_tiled_mlp(model, tiled_plan(3), distribution=SINGLE)
    assert report.tiled == ("base_model.model.model.layers.0.mlp", "base_model.model.model.layers.1.mlp")
    got = logits_and_grads(model, ids)
    assert any("mlp.gate_proj.lora_A" in name for name in got[1]) and not any("base_layer" in n for n in got[1])
    assert_same(got, want)


def test_tiled_mlp_recomputes_lora_dropout_with_the_masks_of_the_forward(tiny_model_dir: Path) -> None:
    """With dropout, slice-by-slice draws other masks than one draw for the whole sequence, so the reference is
    the same slices computed with autograd on (masks drawn in the same order). Without restoring each slice's
    RNG state the backward would draw fresh masks and the gradients would differ."""
    ids = token_batch()
    reference = lora_model(tiny_model_dir, 0.3)
    for layer in reference.base_model.model.model.layers:
        mlp = layer.mlp
        mlp.forward = (lambda untiled: lambda x: torch.cat([untiled(p) for p in x.chunk(3, dim=-2)], dim=-2))(
            mlp.forward)
    want = logits_and_grads(reference, ids)
    model = lora_model(tiny_model_dir, 0.3)
    apply_tiled_mlp(model, tiled_plan(3), distribution=SINGLE)
    assert all(mlp._tiled_mlp.preserve_rng for mlp in (layer.mlp for layer in model.base_model.model.model.layers))
    assert_same(logits_and_grads(model, ids), want)
    untiled = logits_and_grads(lora_model(tiny_model_dir, 0.3), ids)
    assert not torch.allclose(untiled[0], want[0])  # the dropout is real: the reference is not the untiled model


def test_tiled_mlp_keeps_autocast_in_the_recomputation(tiny_model_dir: Path) -> None:
    """Under bf16 autocast the backward's recomputation must run in bf16 too, or the gradients are those of
    another computation."""
    ids = token_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = logits_and_grads(load(tiny_model_dir), ids)
        model = load(tiny_model_dir)
        apply_tiled_mlp(model, tiled_plan(1), distribution=SINGLE)
        got = logits_and_grads(model, ids)
    torch.testing.assert_close(got[0], want[0], atol=0, rtol=0)
    for name in want[1]:
        torch.testing.assert_close(got[1][name], want[1][name], atol=1e-6, rtol=1e-5)


def test_mixture_of_experts_blocks_are_left_untiled(tmp_path: Path) -> None:
    from tunefile.runtime.tiny_model import build_tiny_model

    model = load(build_tiny_model(tmp_path / "llama4", arch="llama4"))
    report = apply_tiled_mlp(model, tiled_plan(2), distribution=SINGLE)
    assert report.tiled == ()
    assert report.untiled == {f"model.layers.{i}.feed_forward": "Llama4TextMoe is a mixture-of-experts block"
                              for i in range(2)}
    assert "not_tiled" in report.record()["tiled_mlp"]


def test_no_plan_no_tiling(tiny_model_dir: Path) -> None:
    model = load(tiny_model_dir)
    assert apply_tiled_mlp(model, None, distribution=SINGLE) == TiledMlpReport(None)
    assert TiledMlpReport(None).record() == {}
    assert not hasattr(model.model.layers[0].mlp, "_tiled_mlp")


def test_a_deep_copy_of_a_tiled_model_tiles_its_own_modules(tiny_model_dir: Path) -> None:
    import copy

    model = load(tiny_model_dir)
    apply_tiled_mlp(model, tiled_plan(2), distribution=SINGLE)
    clone = copy.deepcopy(model)
    mlp = clone.model.layers[0].mlp
    assert mlp.forward.__self__ is mlp and mlp._untiled_forward.__self__ is mlp
    ids = token_batch()
    assert_same(logits_and_grads(clone, ids), logits_and_grads(load(tiny_model_dir), ids))


def test_deepspeed_runs_deepspeeds_tiled_mlp(tiny_model_dir: Path) -> None:
    """Under DeepSpeed the MLPs run through DeepSpeed's TiledMLP (its ZeRO-3 gradient bookkeeping); on one
    process without an engine it must give the untiled gradients too."""
    require_module("deepspeed", "pip install deepspeed")
    distribution = replace(SINGLE, strategy="deepspeed", deepspeed=DeepSpeedPlan(
        stage=3, config_file="ds.json", leaf_module_class=None,
        frozen_base_whole=False))
    ids = token_batch()
    want = logits_and_grads(load(tiny_model_dir), ids)
    model = load(tiny_model_dir)
    report = apply_tiled_mlp(model, tiled_plan(3), distribution=distribution)
    assert report.implementation == "deepspeed TiledMLP"
    assert_same(logits_and_grads(model, ids), want)


# --- tiled MLP: DDP and FSDP2, two processes on the CPU ---------------------------------------------------------

ROWS, LENGTH = 4, 40


def distributed_worker(model_dir: str, out: str) -> None:
    """One rank of a two-process gloo run (started by the test below, through this file's __main__): the
    tiled model under DDP (with reentrant gradient checkpointing) and under FSDP2, on this rank's half of the
    batch; rank 0 writes the full gradients."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    from tunefile.runtime.model import enable_gradient_checkpointing

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = token_batch(ROWS, LENGTH)[rank * ROWS // world:(rank + 1) * ROWS // world]
    plan = replace(SINGLE, strategy="ddp", world_size=world)
    results = {}

    model = load(Path(model_dir))
    enable_gradient_checkpointing(model, {"use_reentrant": True}, frozen_inputs=False)
    apply_tiled_mlp(model, tiled_plan(3), distribution=plan)
    ddp = DistributedDataParallel(model)
    ddp(input_ids=mine, use_cache=False).logits.pow(2).mean().backward()
    results["ddp"] = {name: p.grad.clone() for name, p in model.named_parameters()}

    model = load(Path(model_dir))
    apply_tiled_mlp(model, tiled_plan(3), distribution=replace(plan, strategy="fsdp"))
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model(input_ids=mine, use_cache=False).logits.pow(2).mean().backward()
    results["fsdp2"] = {name: p.grad.full_tensor() for name, p in model.named_parameters()}
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


def test_tiled_mlp_under_ddp_and_fsdp2(tiny_model_dir: Path, tmp_path: Path) -> None:
    from runtime_bundles import free_port

    out = tmp_path / "grads.pt"
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1"}
    ranks = [subprocess.Popen([sys.executable, __file__, str(tiny_model_dir), str(out)],
                              env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(2)]
    outputs = [rank.communicate(timeout=180)[0] for rank in ranks]
    assert all(rank.returncode == 0 for rank in ranks), "\n".join(o[-3000:] for o in outputs)
    # The reference: one untiled process on the whole batch. Each rank's mean over its half, averaged over the two
    # ranks by DDP / FSDP2, is the mean over the whole batch.
    _, want = logits_and_grads(load(tiny_model_dir), token_batch(ROWS, LENGTH))
    results = torch.load(out)
    for strategy, grads in results.items():
        assert grads.keys() == want.keys(), strategy
        for name in want:
            torch.testing.assert_close(grads[name], want[name], **TOLERANCE, msg=f"{strategy}: {name}")


# --- FP8 ---------------------------------------------------------------------------------------------------

HOPPER = ("cuda", (9, 0))
FSDP2 = replace(SINGLE, strategy="fsdp", world_size=2, processes_per_node=2, fsdp=FsdpPlan(
    version=2, offload_params=False, state_dict_type="FULL_STATE_DICT", auto_wrap_policy="TRANSFORMER_BASED_WRAP",
    layer_cls_to_wrap="LlamaDecoderLayer", reshard_after_forward=True, cpu_ram_efficient_loading=False,
    activation_checkpointing=False))


@pytest.fixture
def torchao_installed() -> None:
    require_module("torchao", "FP8 training needs it: pip install 'tunefile[torchao]'")


NEEDS_TORCHAO = pytest.mark.usefixtures("torchao_installed")


def fp8_plan(recipe: str = "tensorwise", all_gather: bool = False) -> Fp8Plan:
    return Fp8Plan(recipe=recipe, fsdp_float8_all_gather=all_gather)


def decide(plan: Fp8Plan | None, distribution: DistributionPlan = SINGLE, *, precision: str = "bf16",
           machine: tuple = HOPPER, torchao: str | None = None) -> fp8.Fp8Choice:
    """decide_fp8 as on a Hopper GPU with torchao, unless told otherwise."""
    return fp8.decide_fp8(plan, precision=precision, distribution=distribution, machine=machine, torchao=torchao)


def float8_names(model: torch.nn.Module) -> set[str]:
    from torchao.float8.float8_linear import Float8Linear

    return {name for name, module in model.named_modules() if isinstance(module, Float8Linear)}


def convert(model: torch.nn.Module) -> fp8.Float8LayerFilter:
    from torchao.float8 import convert_to_float8_training

    layer_filter = fp8.Float8LayerFilter(model)
    convert_to_float8_training(model, module_filter_fn=layer_filter, config=fp8.float8_config("tensorwise",
                                                                                                all_gather=False))
    return layer_filter


@NEEDS_TORCHAO
def test_the_filter_converts_the_layers_axolotls_accelerate_filter_does(tiny_model_dir: Path) -> None:
    from accelerate.utils.ao import filter_linear_layers, find_first_last_linear_layers

    model = load(tiny_model_dir)
    first_and_last = list(find_first_last_linear_layers(model))
    axolotl = {name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
               and filter_linear_layers(module, name, layers_to_filter=first_and_last)}
    layer_filter = convert(model)
    every_linear = {f"model.layers.{i}.{kind}" for i in range(2) for kind in
                    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert float8_names(model) == every_linear - {"model.layers.0.self_attn.q_proj"} == axolotl
    assert sorted(layer_filter.converted) == sorted(float8_names(model))
    assert dict(layer_filter.kept) == {fp8.FIRST_OR_LAST: 1, fp8.OUTPUT_HEAD: 1}
    # torchao's float8 matmul runs on the CPU too: the converted model trains.
    loss = model(input_ids=token_batch(), use_cache=False).logits.float().pow(2).mean()
    loss.backward()
    assert torch.isfinite(loss) and model.model.layers[1].mlp.up_proj.weight.grad.abs().sum() > 0


@NEEDS_TORCHAO
def test_the_filter_keeps_lora_matrices_heads_routers_and_odd_shapes(tiny_model_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    from tunefile.runtime.tiny_model import build_tiny_model

    model = get_peft_model(load(tiny_model_dir), LoraConfig(r=16, lora_alpha=16, target_modules="all-linear",
                                                            modules_to_save=["lm_head"], task_type="CAUSAL_LM"))
    layer_filter = convert(model)
    converted = float8_names(model)
    assert "base_model.model.model.layers.1.mlp.down_proj.base_layer" in converted
    assert not any("lora_" in name or "lm_head" in name for name in converted)
    assert "base_model.model.model.layers.0.self_attn.q_proj.base_layer" not in converted  # the first linear layer
    assert layer_filter.kept[fp8.ADAPTER] == 2 * 2 * 7  # A and B of every adapted layer
    assert layer_filter.kept[fp8.OUTPUT_HEAD] == 2  # peft's two copies of the head
    # Llama 4's router is an nn.Linear (64 → 4 experts): kept, as Axolotl's router patch does.
    moe = load(build_tiny_model(tmp_path / "llama4", arch="llama4"))
    kept = convert(moe).kept
    assert not any("router" in name for name in float8_names(moe)) and kept[fp8.ROUTER] == 2
    odd = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 24), torch.nn.Linear(24, 64),
                              torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    odd.get_output_embeddings = lambda: None
    assert convert(odd).kept == {fp8.FIRST_OR_LAST: 2, fp8.NOT_MULTIPLE: 2}
    assert float8_names(odd) == {"3"}


@NEEDS_TORCHAO
def test_accelerate_converts_the_filtered_layers_in_prepare(tiny_model_dir: Path) -> None:
    """The path the trainer takes: the Accelerator built with the choice's settings converts, in prepare, exactly
    the layers the filter picks (here on the CPU, which runs torchao's float8 matmul too)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    choice = decide(fp8_plan())
    assert choice.enabled and choice.fallback is None
    settings = choice.accelerator_settings(deepspeed=False)
    assert settings["mixed_precision"] == "fp8" and choice.accelerator_settings(deepspeed=True).keys() == {
        "kwargs_handlers"}
    AcceleratorState._reset_state(True)
    try:
        accelerator = Accelerator(cpu=True, **settings)
        model = load(tiny_model_dir)
        choice.use_filter_for(model)
        prepared = accelerator.prepare(model)
        assert float8_names(prepared) == set(choice.layer_filter.converted) and len(float8_names(prepared)) == 13
        with accelerator.autocast():
            loss = prepared(input_ids=token_batch(), use_cache=False).logits.float().pow(2).mean()
        accelerator.backward(loss)
        assert torch.isfinite(loss)
        assert choice.record(prepared) == {"fp8": {
            "enabled": True, "recipe": "tensorwise", "fsdp_float8_all_gather": False, "float8_layers": 13,
            "high_precision_layers": {fp8.FIRST_OR_LAST: 1, fp8.OUTPUT_HEAD: 1}}}
    finally:
        AcceleratorState._reset_state(True)


@pytest.mark.parametrize(("machine", "problem", "reason"), [
    (("cpu", None), None, "FP8 training needs a CUDA GPU and this run is on the cpu; training in bf16"),
    (("cuda", (8, 0)), None, "FP8 training needs compute capability 8.9 or newer (Ada, Hopper) and this GPU is 8.0; "
                             "training in bf16"),
    (HOPPER, "cannot be imported (ImportError: no torchao)",
     "FP8 training needs torchao, which cannot be imported (ImportError: no torchao) (pip install "
     "'tunefile[torchao]'); training in bf16"),
])
def test_a_machine_without_float8_trains_in_bf16_and_says_why(machine: tuple, problem: str | None,
                                                               reason: str) -> None:
    choice = decide(fp8_plan(), machine=machine, torchao=problem)
    assert not choice.enabled and choice.fallback == reason
    assert choice.accelerator_settings(deepspeed=False) == {}
    choice.use_filter_for(torch.nn.Linear(16, 16))  # nothing to convert
    assert choice.record() == {"fp8": {"enabled": False, "recipe": "tensorwise", "fsdp_float8_all_gather": False,
                                       "fallback": reason}}
    assert fp8.decide_fp8(None, precision="bf16", distribution=SINGLE).record() == {}


def test_an_ada_gpu_runs_float8() -> None:
    assert fp8.machine_reason("cuda", (8, 9), None) is None


@NEEDS_TORCHAO
def test_the_float8_all_gather_is_fsdp2s() -> None:
    on_fsdp2 = decide(fp8_plan(all_gather=True), FSDP2)
    assert on_fsdp2.all_gather and on_fsdp2.handler.config.enable_fsdp_float8_all_gather and not on_fsdp2.notes
    on_ddp = decide(fp8_plan(all_gather=True), replace(SINGLE, strategy="ddp"))
    assert not on_ddp.all_gather and not on_ddp.handler.config.enable_fsdp_float8_all_gather
    assert on_ddp.record()["fp8"]["notes"] == ["fsdp_float8_all_gather has no effect: it changes FSDP2's weight "
                                               "all-gather, and this run does not use FSDP2"]
    rowwise = decide(fp8_plan("rowwise"), FSDP2)
    from torchao.float8.config import ScalingGranularity

    assert rowwise.handler.config.cast_config_weight.scaling_granularity == ScalingGranularity.AXISWISE


@NEEDS_TORCHAO
def test_fp8_runs_the_rest_in_bf16_whatever_the_precision() -> None:
    assert decide(fp8_plan(), precision="fp16").notes == [
        "what is not float8 computes in bf16 autocast (accelerate's fp8 mode), not fp16"]
    deepspeed = replace(SINGLE, strategy="deepspeed", deepspeed=DeepSpeedPlan(
        stage=2, config_file="ds.json", leaf_module_class=None,
        frozen_base_whole=False))
    assert decide(fp8_plan(), deepspeed, precision="fp16").notes == []  # DeepSpeed's config holds the precision


@NEEDS_TORCHAO
def test_plans_fp8_cannot_run_anywhere_are_refused() -> None:
    with pytest.raises(fp8.Fp8Error, match="tensorwise only"):
        decide(fp8_plan("rowwise_with_gw_hp", all_gather=True), FSDP2)
    with pytest.raises(fp8.Fp8Error, match="cpu_ram_efficient_loading: false"):
        efficient_loading = replace(FSDP2, fsdp=replace(FSDP2.fsdp, cpu_ram_efficient_loading=True))
        decide(fp8_plan(), efficient_loading)


if __name__ == "__main__":
    distributed_worker(sys.argv[1], sys.argv[2])
