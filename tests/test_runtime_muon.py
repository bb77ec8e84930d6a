"""optimizer: muon in the runtime (tunefile.runtime.optim): torch's Muon for the hidden weight matrices and AdamW for
the rest, as Axolotl splits them (axolotl-contribs-mit's MuonOptimizerFactory), stepped at Axolotl's learning rates,
and as one optimizer to the scheduler, the checkpoints and FSDP2's parameter swap. The Muon step is compared with
torch's own Muon, the AdamW step with torch's AdamW; a two-process test steps DTensor shards as FSDP2 hands them
over."""

from __future__ import annotations

import io
import math
import re
import socket
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh  # imported before the fork: the children inherit it
from torch.distributed.tensor import Shard, distribute_tensor

from runtime_bundles import compile_bundle, launch, safetensors, train_losses, workspace, write_config
from tunefile.runtime import optim
from tunefile.schemas.run_plan import OptimizerPlan

PLAN = OptimizerPlan(name="muon", learning_rate=0.02, weight_decay=0.01, max_grad_norm=1.0, adam_beta1=0.8,
                     adam_beta2=0.95, adam_epsilon=1e-6, bf16_stochastic_round=False)
HIDDEN_MATRIX = re.compile(r"model\.layers\.\d+\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj\.weight")


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    """Two layers; GQA (k/v are wide matrices), biases on the attention projections, an untied output head."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attention_bias=True, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


BATCH = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))


def lm_loss(model: torch.nn.Module) -> torch.Tensor:
    return model(input_ids=BATCH, labels=BATCH).loss


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: object, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        loss = lm_loss(model)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def names(named: list[tuple[str, torch.nn.Parameter]]) -> set[str]:
    return {name for name, _ in named}


# --- which parameters Muon updates ------------------------------------------------------------------------------

def test_muon_takes_the_hidden_matrices_and_adamw_the_embeddings_head_norms_and_biases() -> None:
    model = tiny_llama()
    split = optim.muon_split(model)
    every = {name for name, _ in model.named_parameters()}
    hidden = {name for name in every if HIDDEN_MATRIX.fullmatch(name)}
    assert len(hidden) == 14  # 7 projections × 2 layers
    assert names(split.muon) == hidden
    assert names(split.adamw) == every - hidden  # embed_tokens, lm_head, the norms, the q/k/v biases
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
            "model.layers.0.self_attn.q_proj.bias"} <= names(split.adamw)
    assert split.adamw_decayed == []

    optimizer = optim.build_optimizer(model, PLAN, device_type="cpu")
    assert isinstance(optimizer, optim.MuonWithAdamW) and "muon" in optim.OPTIMIZERS
    by_algorithm = {"muon": set(), "adamw": set()}
    ids = {id(param): name for name, param in model.named_parameters()}
    for group in optimizer.param_groups:
        by_algorithm[group["algorithm"]] |= {ids[id(param)] for param in group["params"]}
        # Axolotl's factory: Muon's matrices are decayed, what AdamW updates here is not.
        assert group["weight_decay"] == (PLAN.weight_decay if group["algorithm"] == "muon" else 0.0)
    assert by_algorithm == {"muon": hidden, "adamw": every - hidden}


class GptLike(torch.nn.Module):
    """GPT-2's names (wte, wpe, a head that is not lm_head), a frozen matrix and a 3-D tensor (fused experts)."""

    def __init__(self) -> None:
        super().__init__()
        self.wte, self.wpe = torch.nn.Embedding(16, 8), torch.nn.Embedding(4, 8)
        self.mix = torch.nn.Linear(8, 8)
        self.frozen = torch.nn.Linear(8, 8, bias=False).requires_grad_(False)
        self.experts = torch.nn.Parameter(torch.randn(2, 8, 8))
        self.out = torch.nn.Linear(8, 16, bias=False)

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.out


def test_embeddings_and_the_head_are_found_by_module_whatever_their_names() -> None:
    split = optim.muon_split(GptLike())
    assert names(split.muon) == {"mix.weight"}
    assert names(split.adamw) == {"wte.weight", "wpe.weight", "mix.bias", "out.weight"}
    assert names(split.adamw_decayed) == {"experts"}  # torch's Muon takes only matrices; the frozen one is left out
    optimizer = optim.build_optimizer(GptLike(), PLAN, device_type="cpu")
    decayed = [group for group in optimizer.param_groups if group["algorithm"] == "adamw" and group["weight_decay"]]
    assert [tuple(param.shape) for group in decayed for param in group["params"]] == [(2, 8, 8)]
    fallback = optimizer.record()["optimizer_fallback"]
    assert "AdamW trains the 1 parameter tensor(s) of 3 or more dimensions (experts, …)" in fallback
    assert optim.build_optimizer(tiny_llama(), PLAN, device_type="cpu").record() == {}


# --- the step ---------------------------------------------------------------------------------------------------

def two_matrices(seed: int = 0) -> torch.nn.Module:
    """A wide matrix (4 × 16: out < in) and a tall one (16 × 4), no biases: everything goes to Muon."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 4, bias=False), torch.nn.Linear(4, 16, bias=False))


def set_gradients(model: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        param.grad = torch.randn(param.shape, generator=generator)


def test_the_muon_step_is_axolotls_spectral_norm_step() -> None:
    """Axolotl steps a (fan_out × fan_in) matrix by lr·sqrt(fan_out / fan_in); torch's own Muon ("original")
    by lr·sqrt(max(1, fan_out / fan_in)). Same orthogonalised update: half of torch's for the 4 × 16 matrix,
    all of it for the 16 × 4 one, over two steps (the momentum carries over)."""
    ours, reference = two_matrices(), two_matrices()
    optimizer = optim.build_optimizer(ours, replace(PLAN, weight_decay=0.0), device_type="cpu")
    torch_muon = torch.optim.Muon(reference.parameters(), lr=PLAN.learning_rate, weight_decay=0.0,
                                  adjust_lr_fn="original")
    before = [param.detach().clone() for param in ours.parameters()]
    for step in range(2):
        set_gradients(ours, step)
        set_gradients(reference, step)
        optimizer.step()
        torch_muon.step()
    (wide, tall), (wide_ref, tall_ref) = ours.parameters(), reference.parameters()
    assert math.sqrt(4 / 16) == 0.5
    torch.testing.assert_close(wide - before[0], 0.5 * (wide_ref - before[0]), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(tall - before[1], tall_ref - before[1], rtol=1e-5, atol=1e-7)
    assert (wide - before[0]).abs().max() > 1e-3  # it did move
    assert [group["lr"] for group in optimizer.param_groups] == [PLAN.learning_rate] * 2  # put back after the step


def test_muon_decays_by_lr_times_weight_decay_whatever_the_matrix_shape() -> None:
    """With a zero gradient only the decoupled decay moves a matrix: W·(1 − lr·weight_decay), for the wide matrix
    too (its step is scaled down, its decay is not)."""
    model = two_matrices()
    optimizer = optim.build_optimizer(model, replace(PLAN, weight_decay=0.1), device_type="cpu")
    before = [param.detach().clone() for param in model.parameters()]
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    optimizer.step()
    for param, old in zip(model.parameters(), before, strict=True):
        torch.testing.assert_close(param.detach(), old * (1 - PLAN.learning_rate * 0.1), rtol=1e-6, atol=0)


def test_the_adamw_half_is_torch_adamw_with_the_plans_betas_and_epsilon_and_no_decay() -> None:
    ours, reference = tiny_llama(), tiny_llama()
    optimizer = optim.build_optimizer(ours, PLAN, device_type="cpu")
    adamw_names = names(optim.muon_split(reference).adamw)
    torch_adamw = torch.optim.AdamW([param for name, param in reference.named_parameters() if name in adamw_names],
                                    lr=PLAN.learning_rate, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.0)
    for _ in range(3):
        lm_loss(ours).backward()
        optimizer.step()
        optimizer.zero_grad()
        # The reference sees the same gradients: the hidden matrices move the same way in both models.
        lm_loss(reference).backward()
        torch_adamw.step()
        torch_adamw.zero_grad()
        for name, param in reference.named_parameters():
            if name not in adamw_names:
                param.data.copy_(ours.get_parameter(name).detach())
    for name in adamw_names:
        assert torch.equal(ours.get_parameter(name), reference.get_parameter(name)), name


def test_a_step_on_the_tiny_llama_lowers_its_loss() -> None:
    model = tiny_llama()
    optimizer = optim.build_optimizer(model, PLAN, device_type="cpu")
    before = lm_loss(model)
    before.backward()
    optimizer.step()
    optimizer.zero_grad()
    with torch.no_grad():
        after = lm_loss(model)
    assert after.item() < before.item() - 0.05


def test_the_scheduler_drives_both_halves() -> None:
    """A schedule at half the peak: every group's lr is halved and the step is exactly that of an optimizer built
    at half the learning rate."""
    scheduled, half = tiny_llama(), tiny_llama()
    optimizer = optim.build_optimizer(scheduled, PLAN, device_type="cpu")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    reference = optim.build_optimizer(half, replace(PLAN, learning_rate=PLAN.learning_rate / 2), device_type="cpu")
    assert {group["lr"] for group in optimizer.param_groups} == {PLAN.learning_rate / 2}
    for model, opt in ((scheduled, optimizer), (half, reference)):
        lm_loss(model).backward()
        opt.step()
    scheduler.step()
    for (name, a), b in zip(scheduled.named_parameters(), half.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_a_state_dict_round_trip_resumes_exactly() -> None:
    """Six steps straight, and three + save + a new model, optimizer and schedule loaded from the save + three:
    the same weights, bit for bit (Muon's momentum and AdamW's moments and step counts all came back)."""
    def fresh(model: torch.nn.Module) -> tuple[torch.optim.Optimizer, object]:
        opt = optim.build_optimizer(model, PLAN, device_type="cpu")
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, optim.lr_multiplier("cosine", total_steps=6, warmup=2))

    straight = tiny_llama()
    train(straight, *fresh(straight), 6)

    first = tiny_llama()
    optimizer, scheduler = fresh(first)
    train(first, optimizer, scheduler, 3)
    saved = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict()}, saved)
    saved.seek(0)
    checkpoint = torch.load(saved, weights_only=True)
    assert {group["algorithm"] for group in checkpoint["optimizer"]["param_groups"]} == {"muon", "adamw"}

    resumed = tiny_llama(seed=1)  # other weights until the checkpoint's are loaded
    resumed.load_state_dict(checkpoint["model"])
    optimizer, scheduler = fresh(resumed)
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    train(resumed, optimizer, scheduler, 3)
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_parameters_swapped_in_the_groups_are_the_ones_stepped() -> None:
    """accelerate's FSDP2 preparation replaces each group's parameters with their sharded versions after the
    optimizer is built; both halves must step the new ones and leave the old ones alone."""
    model = tiny_llama()
    optimizer = optim.build_optimizer(model, PLAN, device_type="cpu")
    originals = [param.detach().clone() for param in model.parameters()]
    swapped = []
    for group in optimizer.param_groups:
        group["params"] = [torch.nn.Parameter(param.detach().clone()) for param in group["params"]]
        swapped += group["params"]
    for param in swapped:
        param.grad = torch.randn(param.shape, generator=torch.Generator().manual_seed(len(swapped)))
    starting = [param.detach().clone() for param in swapped]
    optimizer.step()
    assert {group["algorithm"] for group in optimizer.param_groups} == {"muon", "adamw"}
    assert all(not torch.equal(param, start) for param, start in zip(swapped, starting, strict=True))
    assert all(torch.equal(param, old) for param, old in zip(model.parameters(), originals, strict=True))


def test_a_flattened_matrix_is_a_clear_error() -> None:
    model = two_matrices()
    optimizer = optim.build_optimizer(model, PLAN, device_type="cpu")
    flat = torch.nn.Parameter(torch.zeros(64))
    flat.grad = torch.ones(64)
    optimizer.param_groups[0]["params"] = [flat]  # what FSDP1 and DeepSpeed hand an optimizer
    with pytest.raises(optim.OptimizerError, match="FSDP2"):
        optimizer.step()


def test_a_model_with_nothing_for_muon_is_refused() -> None:
    with pytest.raises(optim.OptimizerError, match="adamw_torch"):
        optim.build_optimizer(torch.nn.Sequential(torch.nn.Embedding(8, 4), torch.nn.LayerNorm(4)), PLAN,
                              device_type="cpu")


# --- FSDP2's DTensor shards -------------------------------------------------------------------------------------

def sharded_steps(rank: int, port: int, result: str) -> None:
    """One of two gloo ranks: the optimizer is built on whole parameters, which are then swapped for DTensors
    sharded on dim 0 (what FSDP2 does under accelerate); two steps on the same full gradients as the reference."""
    torch.set_num_threads(1)  # a forked child: no OpenMP pool inherited from the parent
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model = matrix_and_bias()
        optimizer = optim.build_optimizer(model, PLAN, device_type="cpu")
        mesh = init_device_mesh("cpu", (2,))
        for group in optimizer.param_groups:
            group["params"] = [torch.nn.Parameter(distribute_tensor(param.detach(), mesh, [Shard(0)]))
                               for param in group["params"]]
        sharded = [param for group in optimizer.param_groups for param in group["params"]]  # matrix, then bias
        for step in range(2):
            for param, grad in zip(sharded, full_gradients(step), strict=True):
                param.grad = distribute_tensor(grad, mesh, [Shard(0)])
            optimizer.step()
        gathered = [param.full_tensor() for param in sharded]
        if rank == 0:
            torch.save(gathered, result)
    finally:
        dist.destroy_process_group()


def matrix_and_bias() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(24, 16)  # a wide 16 × 24 matrix for Muon, a 16-long bias for AdamW


def full_gradients(step: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(10 + step)
    return [torch.randn(16, 24, generator=generator), torch.randn(16, generator=generator)]


def test_fsdp2_dtensor_shards_step_as_the_whole_parameters_do(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = tmp_path / "sharded.pt"
    mp.start_processes(sharded_steps, args=(port, str(result)), nprocs=2, start_method="fork")

    model = matrix_and_bias()
    start = [param.detach().clone() for param in model.parameters()]
    optimizer = optim.build_optimizer(model, PLAN, device_type="cpu")
    for step in range(2):
        for param, grad in zip(model.parameters(), full_gradients(step), strict=True):
            param.grad = grad
        optimizer.step()
    (matrix, bias), (sharded_matrix, sharded_bias) = model.parameters(), torch.load(result, weights_only=True)
    torch.testing.assert_close(sharded_bias, bias.detach(), rtol=0, atol=1e-7)  # AdamW: elementwise, fp32
    # Muon's Newton-Schulz iteration runs in bf16; on DTensors its matmuls sum in another order.
    update = (matrix - start[0]).abs().max().item()
    assert (sharded_matrix - matrix.detach()).abs().max().item() < 0.05 * update
    assert update > 0.01


# --- end to end -------------------------------------------------------------------------------------------------

def test_a_compiled_full_fine_tune_with_muon_trains_and_resumes_exactly(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Ten steps of the tiny model with optimizer: muon (the loss falls), and the same run killed after step 7 and
    relaunched from its step-5 checkpoint: the same final weights (Muon's momentum came back from the checkpoint)."""
    model_dir = tiny_model_dir
    common = {"optimizer": "muon", "learning_rate": 0.02, "weight_decay": 0.01, "max_steps": 10, "save_steps": 5,
              "lr_scheduler": "cosine"}
    straight = workspace(tmp_path / "a", model_dir)
    launch(compile_bundle(write_config(straight, **common)))
    losses = train_losses(straight / "out")
    assert len(losses) == 10 and sum(losses[-3:]) / 3 < losses[0] - 0.5

    interrupted = workspace(tmp_path / "b", model_dir)
    bundle = compile_bundle(write_config(interrupted, **common))
    crashed = launch(bundle, env={"TUNEFILE_FAULT_AFTER_STEP": "7"}, check=False)
    assert crashed.returncode != 0
    resumed = launch(bundle)
    assert re.search(r"resumed from \S*checkpoint-5 at step 5", resumed.stdout + resumed.stderr)
    a, b = safetensors(straight / "out" / "model.safetensors"), safetensors(interrupted / "out" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert (interrupted / "out" / "checkpoint-10").is_dir()
