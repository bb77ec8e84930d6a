"""Liger's kernels and the fused losses (runtime/kernels.py, losses.linear_token_loss_sum).

On the CPU: every requested kernel falls back with its reason and training is the plain path's, to the bit;
the fused-loss plumbing (label shift, ignored labels, softcap, the matmul dtype, the decoder hook through peft
and packing) gives token_loss_sum's sum and gradients when a pure-PyTorch chunked linear cross-entropy stands
in for the Triton kernels. Marked `gpu`: the real kernels on a tiny model, against the plain path, and
training through a compiled bundle with the plugins on.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml

from helpers import require_module
from runtime_bundles import (
    build_tiny_model,
    compile_bundle,
    launch,
    metrics,
    summary,
    train_losses,
    workspace,
    write_config,
)
from tunefile.runtime import attention, kernels
from tunefile.runtime.losses import IGNORE_INDEX, linear_token_loss_sum, token_loss_sum
from tunefile.schemas.run_plan import DeepSpeedPlan, DistributionPlan, KernelsPlan

SINGLE = DistributionPlan(strategy="single", device="cuda", num_nodes=1, processes_per_node=1, world_size=1)
NO_KERNELS = KernelsPlan(**{f.name: False for f in dataclasses.fields(KernelsPlan)})
# What the Liger plugin can ask for: every kernel but cut-cross-entropy's loss.
LIGER_ALL = KernelsPlan(**{f.name: f.name != "cut_cross_entropy" for f in dataclasses.fields(KernelsPlan)})
LIGER_REQUESTED = [f.name for f in dataclasses.fields(KernelsPlan) if f.name != "cut_cross_entropy"]
CCE = dataclasses.replace(NO_KERNELS, cut_cross_entropy=True)


def chunked_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                 targets: torch.Tensor, softcap: float | None, *, chunk: int = 5) -> torch.Tensor:
    """A pure-PyTorch stand-in for the fused kernels, behind their interface: the sum of the cross-entropies,
    a few rows of logits at a time, recomputed in backward (checkpointing) instead of kept."""
    def chunk_loss(rows: torch.Tensor, rows_targets: torch.Tensor) -> torch.Tensor:
        logits = F.linear(rows, weight, bias).float()
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        return F.cross_entropy(logits, rows_targets, ignore_index=IGNORE_INDEX, reduction="sum")

    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk):
        total = total + torch.utils.checkpoint.checkpoint(chunk_loss, hidden[start:start + chunk],
                                                          targets[start:start + chunk], use_reentrant=False)
    return total


def _labels(batch: int, length: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    labels = torch.randint(0, vocab, (batch, length), generator=generator)
    ignored = torch.rand(batch, length, generator=generator) < 0.3
    return labels.masked_fill(ignored, IGNORE_INDEX)


# --- the loss from hidden states, on random data ------------------------------------------------------------

@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_linear_token_loss_sum_is_token_loss_sum_of_the_logits(with_bias: bool, softcap: float | None) -> None:
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 11, 16, generator=generator, requires_grad=True)
    weight = torch.randn(50, 16, generator=generator, requires_grad=True)
    bias = torch.randn(50, generator=generator, requires_grad=True) if with_bias else None
    labels = _labels(3, 11, 50, generator)

    logits = F.linear(hidden, weight, bias)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    plain_sum, plain_count = token_loss_sum(logits, labels)
    plain_grads = torch.autograd.grad(plain_sum, [t for t in (hidden, weight, bias) if t is not None])

    fused_sum, fused_count = linear_token_loss_sum(hidden, weight, bias, labels, dtype=torch.float32, softcap=softcap,
                                                   linear_cross_entropy=chunked_linear_cross_entropy)
    fused_grads = torch.autograd.grad(fused_sum, [t for t in (hidden, weight, bias) if t is not None])

    assert int(fused_count) == int(plain_count) == int((labels[:, 1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(fused_sum, plain_sum, rtol=1e-5, atol=1e-4)
    for fused, plain in zip(fused_grads, plain_grads, strict=True):
        torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)


def test_the_kernel_gets_the_run_precision_and_no_autocast() -> None:
    """The plain path's head runs under accelerate's autocast (inside the model's forward only): the fused
    loss casts to the run's dtype itself, with autocast off around the kernel."""
    seen: dict[str, Any] = {}

    def spy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
            softcap: float | None) -> torch.Tensor:
        seen.update(hidden=hidden.dtype, weight=weight.dtype, autocast=torch.is_autocast_enabled("cpu"),
                    shape=tuple(hidden.shape), targets=targets.clone())
        return chunked_linear_cross_entropy(hidden, weight, bias, targets, softcap)

    generator = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(2, 6, 8, generator=generator), torch.randn(20, 8, generator=generator)
    labels = _labels(2, 6, 20, generator)
    labels[:, 1] = 3  # at least one label token
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_sum, _ = linear_token_loss_sum(hidden, weight, None, labels, dtype=torch.bfloat16, softcap=None,
                                            linear_cross_entropy=spy)
    assert seen["hidden"] == seen["weight"] == torch.bfloat16 and seen["autocast"] is False
    assert seen["shape"] == (12, 8)  # every position, no copy shifted by one
    # Position t is scored against label t + 1; the last position of each row against nothing.
    expected = torch.cat([labels[:, 1:], torch.full((2, 1), IGNORE_INDEX)], dim=1).reshape(-1)
    assert torch.equal(seen["targets"], expected)
    plain, _ = token_loss_sum(F.linear(hidden.bfloat16(), weight.bfloat16()), labels)
    torch.testing.assert_close(loss_sum, plain, rtol=1e-5, atol=1e-4)
    assert loss_sum.dtype == torch.float32


def test_a_micro_batch_without_label_tokens_is_a_zero_that_reaches_every_input() -> None:
    def never(*args: Any) -> torch.Tensor:
        raise AssertionError("the kernel ran on a micro-batch with nothing to score")

    hidden = torch.randn(2, 5, 8, requires_grad=True)
    weight = torch.randn(20, 8, requires_grad=True)
    labels = torch.full((2, 5), IGNORE_INDEX)
    labels[:, 0] = 4  # the first position's label is never predicted: still nothing to score
    loss_sum, count = linear_token_loss_sum(hidden, weight, None, labels, dtype=torch.float32, softcap=None,
                                            linear_cross_entropy=never)
    assert float(loss_sum.detach()) == 0.0 and int(count) == 0
    grad_hidden, grad_weight = torch.autograd.grad(loss_sum, [hidden, weight])
    assert not grad_hidden.any() and not grad_weight.any()


# --- the fused loss on a tiny model: hook, peft, packing ------------------------------------------------------

def _tiny(arch: str = "llama", *, attn_implementation: str = "sdpa", **config: Any) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **shape, **config),
                                            attn_implementation=attn_implementation, dtype=torch.float32)


def _batch(*, packed: bool, attn_implementation: str = "sdpa") -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(forward inputs, labels): two rows of 12 tokens; packed rows hold two samples each, isolated as the
    trainer isolates them."""
    generator = torch.Generator().manual_seed(2)
    input_ids = torch.randint(0, 97, (2, 12), generator=generator)
    labels = input_ids.clone()
    labels[0, :3] = IGNORE_INDEX  # a prompt that is not trained on
    inputs: dict[str, Any] = {"input_ids": input_ids}
    if packed:
        position_ids = torch.cat([torch.arange(5), torch.arange(7)]).repeat(2, 1)
        labels[:, 5] = IGNORE_INDEX  # a sample's first token is not predicted from the sample before it
        inputs["position_ids"] = position_ids
        inputs |= attention.packing_forward_kwargs("block_mask", position_ids, attn_implementation=attn_implementation,
                                                   dtype=torch.float32)
    return inputs, labels


def _plain_and_fused(model: torch.nn.Module, inputs: dict[str, Any], labels: torch.Tensor,
                     loss: kernels.FusedLoss) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """((loss sum, count, gradients…) of the plain path, the same of the fused loss), on the trainable weights."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    results = []
    for compute in (lambda: token_loss_sum(model(**inputs, use_cache=False).logits, labels),
                    lambda: loss(model, inputs, labels)):
        loss_sum, count = compute()
        results.append((loss_sum.detach(), count, *torch.autograd.grad(loss_sum, trainable)))
    return results[0], results[1]


def _assert_same(plain: tuple[torch.Tensor, ...], fused: tuple[torch.Tensor, ...]) -> None:
    assert int(plain[1]) == int(fused[1]) > 0
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-5, atol=1e-4)
    for fused_grad, plain_grad in zip(fused[2:], plain[2:], strict=True):
        torch.testing.assert_close(fused_grad, plain_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("packed", [False, True])
def test_fused_loss_of_a_tiny_model_is_its_plain_loss(arch: str, packed: bool) -> None:
    model = _tiny(arch)
    inputs, labels = _batch(packed=packed)
    loss = kernels.fused_loss(model, "reference", chunked_linear_cross_entropy, dtype=torch.float32)
    _assert_same(*_plain_and_fused(model, inputs, labels, loss))


def test_fused_loss_reads_the_head_peft_trains() -> None:
    """LoRA with lm_head in modules_to_save: peft replaces the head after the loss was built, and its trained
    copy (made to differ from the frozen original here) is the one the loss must use."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_tiny(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                               modules_to_save=["lm_head"], task_type="CAUSAL_LM"))
    loss = kernels.fused_loss(model, "reference", chunked_linear_cross_entropy, dtype=torch.float32)
    head = model.get_base_model().lm_head
    with torch.no_grad():
        head.modules_to_save["default"].weight.add_(torch.randn_like(head.weight))
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # LoRA starts as a no-op; make it count
                parameter.normal_(std=0.1)
    assert kernels.loss_reason(model, "liger_fused_linear_cross_entropy", distribution=SINGLE) is None
    inputs, labels = _batch(packed=True)
    _assert_same(*_plain_and_fused(model, inputs, labels, loss))


def test_softcapped_logits_are_reproduced() -> None:
    """Gemma 2 squashes its logits with final_logit_softcapping; the fused loss passes the cap to the kernel."""
    model = _tiny("gemma2", attn_implementation="eager", head_dim=8, final_logit_softcapping=2.0)
    loss = kernels.fused_loss(model, "reference", chunked_linear_cross_entropy, dtype=torch.float32)
    assert loss.softcap == 2.0
    inputs, labels = _batch(packed=False)
    _assert_same(*_plain_and_fused(model, inputs, labels, loss))


def test_models_the_fused_loss_cannot_reproduce_keep_the_plain_loss() -> None:
    from peft import LoraConfig, get_peft_model

    flce = "liger_fused_linear_cross_entropy"
    assert kernels.loss_reason(_tiny(), flce, distribution=SINGLE) is None
    # Granite divides its logits by logits_scaling.
    assert "not granite" in kernels.loss_reason(_tiny("granite"), flce, distribution=SINGLE)
    zero3 = dataclasses.replace(SINGLE, strategy="deepspeed", deepspeed=DeepSpeedPlan(
        stage=3, config_file="ds.json", leaf_module_class=None,
        frozen_base_whole=False))
    assert "ZeRO-3" in kernels.loss_reason(_tiny(), flce, distribution=zero3)
    # A frozen base kept whole, outside ZeRO-3: the head's weight is a whole tensor the fused loss can read.
    whole_base = dataclasses.replace(zero3, deepspeed=dataclasses.replace(zero3.deepspeed, frozen_base_whole=True))
    assert kernels.loss_reason(_tiny(), flce, distribution=whole_base) is None
    zero2 = dataclasses.replace(zero3, deepspeed=DeepSpeedPlan(
        stage=2, config_file="ds.json", leaf_module_class=None,
        frozen_base_whole=False))
    assert kernels.loss_reason(_tiny(), flce, distribution=zero2) is None
    lora_head = get_peft_model(_tiny(), LoraConfig(r=4, target_modules=["q_proj", "lm_head"], task_type="CAUSAL_LM"))
    assert "LoRA" in kernels.loss_reason(lora_head, flce, distribution=SINGLE)
    with_bias = _tiny()
    with_bias.lm_head = torch.nn.Linear(32, 97, bias=True)
    assert "bias" in kernels.loss_reason(with_bias, "cut_cross_entropy", distribution=SINGLE)
    assert kernels.loss_reason(with_bias, flce, distribution=SINGLE) is None  # Liger's kernel takes a bias


# --- choosing and falling back ------------------------------------------------------------------------------

LLAMA_APPLY = {"rope", "cross_entropy", "fused_linear_cross_entropy", "rms_norm", "swiglu", "model"}
GEMMA_APPLY = {"rope", "cross_entropy", "fused_linear_cross_entropy", "rms_norm", "geglu", "model"}


def test_liger_arguments_follow_the_architecture() -> None:
    def argument(kernel: str, parameters: set[str], activation: str | None = "silu", layer_norms: int = 0,
                 model_type: str = "llama") -> tuple[str | None, str | None]:
        return kernels.liger_argument(kernel, parameters, model_type=model_type, activation=activation,
                                      layer_norms=layer_norms)

    assert argument("liger_rms_norm", LLAMA_APPLY) == ("rms_norm", None)
    assert argument("liger_rope", LLAMA_APPLY) == ("rope", None)
    assert argument("liger_glu_activation", LLAMA_APPLY) == ("swiglu", None)
    assert argument("liger_glu_activation", GEMMA_APPLY, "gelu_pytorch_tanh", model_type="gemma") == ("geglu", None)
    # A kernel that would compute another activation than the model's is not patched in.
    assert argument("liger_glu_activation", LLAMA_APPLY, "gelu")[1] == \
        "Liger's swiglu computes silu / swish, and llama's MLP uses gelu"
    assert "uses gelu" in argument("liger_glu_activation", GEMMA_APPLY, "gelu", model_type="gemma")[1]
    assert argument("liger_layer_norm", LLAMA_APPLY) == (None, "llama has no LayerNorm layers")
    assert argument("liger_layer_norm", LLAMA_APPLY, layer_norms=3)[1] == \
        "liger-kernel has no LayerNorm patch for llama"
    assert argument("liger_layer_norm", LLAMA_APPLY | {"layer_norm"}) == ("layer_norm", None)
    assert argument("liger_rms_norm_gated", LLAMA_APPLY)[1] == "liger-kernel has no gated RMSNorm patch for llama"
    nemotron = {"relu_squared", "cross_entropy", "fused_linear_cross_entropy", "model"}
    assert argument("liger_rms_norm", nemotron, model_type="nemotron")[1] == \
        "liger-kernel has no RMSNorm patch for nemotron"
    assert argument("liger_glu_activation", nemotron, "relu2", model_type="nemotron")[1] == \
        "liger-kernel has no SwiGLU/GeGLU MLP patch for nemotron"
    assert kernels.mlp_activation(_tiny().config) == "silu"
    gemma2 = _tiny("gemma2", attn_implementation="eager", head_dim=8)
    assert kernels.mlp_activation(gemma2.config) == "gelu_pytorch_tanh"


def test_on_the_cpu_every_requested_kernel_falls_back_and_the_model_is_untouched(
        caplog: pytest.LogCaptureFixture) -> None:
    model = _tiny()
    inputs, _ = _batch(packed=False)
    with torch.no_grad():
        before = model(**inputs).logits
    with caplog.at_level(logging.WARNING, logger="tunefile.runtime.kernels"):
        report = kernels.apply_kernels(model, LIGER_ALL, device_type="cpu", precision="fp32", distribution=SINGLE)
    assert report.applied == () and report.loss is None
    assert list(report.fallbacks) == LIGER_REQUESTED
    assert set(report.fallbacks.values()) == {"a Triton kernel, it needs a CUDA GPU, and this process runs on the cpu"}
    assert report.record() == {"kernels": {"applied": [], "fallbacks": report.fallbacks}}
    # One line for the one reason, naming every kernel.
    reason = report.fallbacks["liger_rope"]
    assert [r.getMessage() for r in caplog.records] == [
        f"kernels: {', '.join(LIGER_REQUESTED)} not used, PyTorch's code runs instead: {reason}"]
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, before)
    assert all(type(m).forward is m.forward.__func__ for m in model.modules())  # no forward rebound
    assert kernels.apply_kernels(model, NO_KERNELS, device_type="cpu", precision="fp32",
                                 distribution=SINGLE).record() == {}


def test_missing_packages_fall_back_with_how_to_install_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CUDA machine without liger-kernel or cut-cross-entropy (None in sys.modules makes their import fail,
    installed or not; nothing here runs on the device)."""
    for name in ("liger_kernel", "liger_kernel.transformers", "liger_kernel.transformers.monkey_patch",
                 "cut_cross_entropy"):
        monkeypatch.setitem(sys.modules, name, None)
    liger = kernels.apply_kernels(_tiny(), LIGER_ALL, device_type="cuda", precision="bf16", distribution=SINGLE)
    assert liger.applied == () and liger.loss is None and list(liger.fallbacks) == LIGER_REQUESTED
    assert all(reason.startswith("liger-kernel cannot be imported (") and
               reason.endswith("pip install 'tunefile[liger]'") for reason in liger.fallbacks.values())
    cce = kernels.apply_kernels(_tiny(), CCE, device_type="cuda", precision="bf16", distribution=SINGLE)
    assert cce.applied == () and cce.loss is None
    assert cce.fallbacks["cut_cross_entropy"].endswith("pip install 'tunefile[cce]'")


# --- through a compiled bundle, on the CPU ------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny-model")


def test_a_bundle_asking_for_kernels_trains_like_the_plain_one_on_the_cpu(tmp_path: Path, tiny_model: Path) -> None:
    """A run plan with every Liger kernel and the fused loss on (as compiled for a GPU) landing on a CPU node:
    each falls back, says so in metrics.jsonl and train_summary.json, and the losses are the plain run's."""
    root = workspace(tmp_path, tiny_model)
    bundle = compile_bundle(write_config(root, max_steps=4, adapter="lora", lora_target_linear=True))
    kernel_bundle = shutil.copytree(bundle, root / "kernel-bundle")
    plan = yaml.safe_load((bundle / "config.yaml").read_text(encoding="utf-8"))
    plan["kernels"] = dataclasses.asdict(LIGER_ALL)
    plan["checkpointing"]["output_dir"] = "kernel-out"
    (kernel_bundle / "config.yaml").write_text(yaml.safe_dump(plan, sort_keys=True), encoding="utf-8")

    launch(bundle)
    result = launch(kernel_bundle)
    assert train_losses(root / "kernel-out") == train_losses(root / "out")
    decisions = summary(root / "kernel-out")["runtime_decisions"]["kernels"]
    assert decisions["applied"] == [] and sorted(decisions["fallbacks"]) == sorted(LIGER_REQUESTED)
    assert metrics(root / "kernel-out")[0]["runtime_decisions"]["kernels"] == decisions
    assert "not used, PyTorch's code runs instead" in result.stdout + result.stderr
    assert "kernels" not in summary(root / "out")["runtime_decisions"]


# --- on a GPU, with the real kernels -------------------------------------------------------------------------

GPU_ARCHITECTURES = ("llama", "mistral", "qwen2")


@pytest.fixture
def restore_transformers() -> Any:
    """Liger replaces names in transformers' modelling modules (RoPE, the norm and MLP classes) for the whole
    process; put them back so the next test's plain path is plain."""
    modules = [importlib.import_module(f"transformers.models.{arch}.modeling_{arch}") for arch in GPU_ARCHITECTURES]
    saved = [dict(vars(module)) for module in modules]
    yield
    for module, names in zip(modules, saved, strict=True):
        vars(module).update(names)


def _cuda_tiny(arch: str) -> torch.nn.Module:
    """The tiny model of runtime/tiny_model.py (its shape, random weights), fp32 master weights on the GPU."""
    from transformers import AutoModelForCausalLM

    from tunefile.runtime.tiny_model import model_config

    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need CUDA; deselect them with -m 'not gpu'")
    torch.manual_seed(0)
    config = model_config(arch, vocab_size=1024, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa").cuda()


def _under_bf16_autocast(model: torch.nn.Module) -> torch.nn.Module:
    """What accelerate's bf16 mixed precision does: autocast around the model's forward, and nowhere else."""
    model.forward = torch.autocast("cuda", dtype=torch.bfloat16)(model.forward)
    return model


def _cuda_batch() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(3, 1024, (4, 64), generator=generator)
    labels = input_ids.clone()
    labels[:, :16] = IGNORE_INDEX
    position_ids = torch.cat([torch.arange(24), torch.arange(40)]).repeat(4, 1)
    labels[:, 24] = IGNORE_INDEX
    inputs = {"input_ids": input_ids, "position_ids": position_ids}
    inputs |= attention.packing_forward_kwargs("block_mask", position_ids, attn_implementation="sdpa",
                                               dtype=torch.float32)
    return {k: v.cuda() for k, v in inputs.items()}, labels.cuda()


def _loss_and_grads(model: torch.nn.Module, compute: Any) -> tuple[float, list[torch.Tensor]]:
    loss_sum, count = compute()
    trainable = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss_sum / count, trainable)
    return float(loss_sum.detach() / count), [g.float() for g in grads]


def _assert_close_in_bf16(plain: tuple[float, list[torch.Tensor]], other: tuple[float, list[torch.Tensor]]) -> None:
    assert other[0] == pytest.approx(plain[0], rel=1e-2)
    for a, b in zip(plain[1], other[1], strict=True):
        assert (a - b).norm() <= 0.05 * a.norm() + 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("arch", GPU_ARCHITECTURES)
def test_liger_kernels_patch_a_tiny_model(arch: str, restore_transformers: Any) -> None:
    require_module("liger_kernel", "pip install 'tunefile[liger]'")
    inputs, labels = _cuda_batch()
    plain_model = _under_bf16_autocast(_cuda_tiny(arch))
    # The plain path first: RoPE's patch reaches every model of the architecture in this process.
    plain = _loss_and_grads(plain_model, lambda: token_loss_sum(plain_model(**inputs).logits, labels))
    model = _cuda_tiny(arch)
    modules_only = dataclasses.replace(LIGER_ALL, liger_fused_linear_cross_entropy=False)
    report = kernels.apply_kernels(model, modules_only, device_type="cuda", precision="bf16", distribution=SINGLE)
    assert report.applied == ("liger_rms_norm", "liger_glu_activation", "liger_rope")
    assert report.fallbacks == {"liger_layer_norm": f"{arch} has no LayerNorm layers",
                                "liger_rms_norm_gated": f"liger-kernel has no gated RMSNorm patch for {arch}"}
    assert model.model.norm._get_name() == "LigerRMSNorm"
    assert {layer.mlp._get_name() for layer in model.model.layers} == {"LigerSwiGLUMLP"}
    modelling = importlib.import_module(f"transformers.models.{arch}.modeling_{arch}")
    assert modelling.apply_rotary_pos_emb.__module__.startswith("liger_kernel")
    _under_bf16_autocast(model)
    _assert_close_in_bf16(plain, _loss_and_grads(model, lambda: token_loss_sum(model(**inputs).logits, labels)))


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["liger_fused_linear_cross_entropy", "cut_cross_entropy"])
@pytest.mark.parametrize("adapter", [False, True])
def test_fused_losses_are_the_plain_loss_in_bf16(kernel: str, adapter: bool) -> None:
    require_module("liger_kernel" if kernel.startswith("liger") else "cut_cross_entropy",
                   f"pip install 'tunefile[{kernels.package_of(kernel)[1]}]'")
    model = _cuda_tiny("llama")
    if adapter:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                 modules_to_save=["lm_head"], task_type="CAUSAL_LM"))
    report = kernels.apply_kernels(model, dataclasses.replace(NO_KERNELS, **{kernel: True}), device_type="cuda",
                                   precision="bf16", distribution=SINGLE)
    assert report.applied == (kernel,) and report.fallbacks == {} and report.loss is not None
    _under_bf16_autocast(model)
    inputs, labels = _cuda_batch()
    plain = _loss_and_grads(model, lambda: token_loss_sum(model(**inputs, use_cache=False).logits, labels))
    _assert_close_in_bf16(plain, _loss_and_grads(model, lambda: report.loss(model, inputs, labels)))


PLUGINS = {
    "liger": {"plugins": ["axolotl.integrations.liger.LigerPlugin"], "liger_rms_norm": True,
              "liger_glu_activation": True, "liger_layer_norm": True, "liger_rope": True, "liger_rms_norm_gated": True,
              "liger_fused_linear_cross_entropy": True},
    "cce": {"plugins": ["axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin"], "cut_cross_entropy": True},
}


@pytest.mark.gpu
@pytest.mark.parametrize("plugin", sorted(PLUGINS))
def test_training_with_the_plugins_learns(tmp_path: Path, plugin: str) -> None:
    require_module("liger_kernel" if plugin == "liger" else "cut_cross_entropy", f"pip install 'tunefile[{plugin}]'")
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need CUDA; deselect them with -m 'not gpu'")
    root = workspace(tmp_path, build_tiny_model(tmp_path / "tiny-model-files"))
    config = write_config(root, adapter="lora", lora_target_linear=True, lora_modules_to_save=["lm_head"],
                          learning_rate=1e-2, bf16=True, sample_packing=True, **PLUGINS[plugin])
    launch(compile_bundle(config, target="h100-80gb", gpus_per_node=1))
    losses = train_losses(root / "out")
    assert len(losses) >= 30 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 <= sum(losses[:3]) / 3 / 2
    decisions = summary(root / "out")["runtime_decisions"]["kernels"]
    requested = sorted(key for key, value in PLUGINS[plugin].items() if value is True)
    assert sorted(decisions["applied"] + list(decisions["fallbacks"])) == requested
    assert decisions["fallbacks"] == ({"liger_layer_norm": "llama has no LayerNorm layers",
                                       "liger_rms_norm_gated": "liger-kernel has no gated RMSNorm patch for llama"}
                                      if plugin == "liger" else {})
