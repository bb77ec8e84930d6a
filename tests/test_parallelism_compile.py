"""The compiler's half of N-D parallelism (dp_replicate_size, dp_shard_size, tensor_parallel_size,
context_parallel_size): the sizes become the plan's distribution.parallelism, filled in as Axolotl fills them
(utils/distributed.py's _get_parallel_config_kwargs), and every combination tunefile cannot carry out is one located
error that says what to do instead.

The runtime's half is in tests/test_parallelism_runtime.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from helpers import MINIMAL, write
from tunefile.compiler.errors import ConfigError
from tunefile.compiler.pipeline import Sources, TargetOptions, compile_config
from tunefile.schemas.run_plan import RunPlanError, check_invariants, parse_run_plan

FSDP2 = "fsdp_version: 2\nfsdp_config:\n  auto_wrap_policy: TRANSFORMER_BASED_WRAP\n"


def gpus(per_node: int, nodes: int = 1) -> TargetOptions:
    return TargetOptions(gpu="h100-80gb", gpus_per_node=per_node, nodes=nodes)


def compiled(tmp_path: Path, text: str, options: TargetOptions) -> dict[str, str]:
    return compile_config(write(tmp_path / "c.yml", text), options).files


def plan_of(tmp_path: Path, text: str, options: TargetOptions) -> dict[str, Any]:
    return yaml.safe_load(compiled(tmp_path, text, options)["config.yaml"])


def errors_of(tmp_path: Path, text: str, options: TargetOptions) -> list[str]:
    """Every compile error as the CLI prints it (c.yml:LINE:COL: key: message), the hint left out."""
    sources = Sources()
    with pytest.raises(ConfigError) as caught:
        compile_config(write(tmp_path / "c.yml", text), options, sources)
    # The column (where the value starts) is left out: the line and the key locate it.
    return [re.sub(r"^.*?(c\.yml:\d+):\d+:", r"\1:", sources.format(problem).split("\n")[0])
            for problem in caught.value.problems]


def local_model(tmp_path: Path, **config: Any) -> str:
    """A base_model folder with only a config.json (what the compiler reads): a Llama-shaped default."""
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    values = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
              "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1024,
              "tie_word_embeddings": False} | config
    (folder / "config.json").write_text(json.dumps(values), encoding="utf-8")
    return MINIMAL.replace("meta-llama/Llama-3.1-8B", "model")


def parallelism(plan: dict[str, Any]) -> dict[str, int] | None:
    return plan["distribution"].get("parallelism")


# --- the sizes become the plan's mesh -----------------------------------------------------------------------

def test_fsdp_tp_cp_on_eight_gpus_is_axolotls_qwen3_example(tmp_path: Path) -> None:
    text = MINIMAL + FSDP2 + "dp_shard_size: 2\ncontext_parallel_size: 2\ntensor_parallel_size: 2\n"
    files = compiled(tmp_path, text, gpus(8))
    plan = yaml.safe_load(files["config.yaml"])
    assert plan["distribution"]["strategy"] == "fsdp" and plan["distribution"]["fsdp"]["version"] == 2
    assert parallelism(plan) == {"dp_replicate_size": 1, "dp_shard_size": 2, "tensor_parallel_size": 2,
                                 "context_parallel_size": 2}
    accelerate = files["accelerate.yaml"]
    assert "distributed_type: FSDP" in accelerate and "fsdp_version: 2" in accelerate
    assert "# N-D parallelism: dp_replicate 1 × dp_shard 2 × context_parallel 2 × tensor_parallel 2" in accelerate
    assert "parallelism_config" not in accelerate  # the runtime builds it; accelerate launch must not


def test_hsdp_with_tensor_parallelism_on_two_nodes_is_axolotls_llama_example(tmp_path: Path) -> None:
    text = MINIMAL + FSDP2 + "dp_shard_size: 4\ndp_replicate_size: 2\ntensor_parallel_size: 2\n"
    plan = plan_of(tmp_path, text, gpus(8, nodes=2))
    assert parallelism(plan) == {"dp_replicate_size": 2, "dp_shard_size": 4, "tensor_parallel_size": 2,
                                 "context_parallel_size": 1}
    assert plan["distribution"]["world_size"] == 16


@pytest.mark.parametrize("sizes, strategy, expected", [
    # The GPUs tensor and context parallelism leave are shards under FSDP, replicas under DDP (Axolotl).
    ("context_parallel_size: 2\n", "strategy: ddp\n", (1, 1, 1, 2)),
    ("context_parallel_size: 2\n", "strategy: ddp\n", (2, 1, 1, 2)),
    ("context_parallel_size: 2\n", FSDP2, (1, 2, 1, 2)),
    ("tensor_parallel_size: 2\n", FSDP2, (1, 2, 2, 1)),
    # HSDP: a dp_shard_size that leaves GPUs over makes them replicas, and the other way round.
    ("dp_shard_size: 2\n", FSDP2, (2, 2, 1, 1)),
    ("dp_replicate_size: 2\n", FSDP2, (2, 2, 1, 1)),
    ("dp_replicate_size: 2\ncontext_parallel_size: 2\n", "deepspeed: zero2\n", (2, 1, 1, 2)),
])
def test_sizes_are_filled_in_as_axolotl_fills_them(tmp_path: Path, sizes: str, strategy: str,
                                                   expected: tuple[int, int, int, int]) -> None:
    world = expected[0] * expected[1] * expected[2] * expected[3]
    plan = plan_of(tmp_path, MINIMAL + strategy + sizes, gpus(world))
    mesh = parallelism(plan)
    assert (mesh["dp_replicate_size"], mesh["dp_shard_size"], mesh["tensor_parallel_size"],
            mesh["context_parallel_size"]) == expected


@pytest.mark.parametrize("sizes, strategy", [
    ("tensor_parallel_size: 1\ncontext_parallel_size: 1\ndp_replicate_size: 1\n", ""),  # Axolotl's defaults
    ("dp_shard_size: 4\n", FSDP2),  # plain FSDP over every GPU
    ("dp_shard_size: 1\n", FSDP2),  # 1 is "unset": FSDP over every GPU, as in Axolotl
    ("dp_replicate_size: 4\n", "strategy: ddp\n"),  # plain DDP
])
def test_plain_data_parallelism_has_no_parallelism_section(tmp_path: Path, sizes: str, strategy: str) -> None:
    assert parallelism(plan_of(tmp_path, MINIMAL + strategy + sizes, gpus(4))) is None


def test_explain_says_how_many_different_micro_batches_a_step_trains(tmp_path: Path) -> None:
    compilation = compile_config(write(tmp_path / "c.yml", MINIMAL + FSDP2 + "tensor_parallel_size: 2\n"
                                       "context_parallel_size: 2\n"), gpus(8))
    (decision,) = [d for d in compilation.plan.decisions if d.topic == "parallelism"]
    assert decision.value == "dp_replicate 1 × dp_shard 2 × context_parallel 2 × tensor_parallel 2"
    assert "2 different micro-batches per step" in decision.reason


@pytest.mark.parametrize("sizes", ["tensor_parallel_size: 2\n", "context_parallel_size: 2\n"])
def test_a_fused_loss_is_a_warning_at_the_plugin_line(tmp_path: Path, sizes: str) -> None:
    """Axolotl's CutCrossEntropyPlugin turns cut_cross_entropy on by default: the warning points at the plugin."""
    text = MINIMAL + FSDP2 + sizes + "plugins:\n  - axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin\n"
    compilation = compile_config(write(tmp_path / "c.yml", text), gpus(4))
    (warning,) = [w for w in compilation.plan.warnings if "plain loss runs" in w.message]
    assert warning.path == ("plugins", 0)
    without = compile_config(write(tmp_path / "c.yml", MINIMAL + FSDP2 + sizes), gpus(4))
    assert not [w for w in without.plan.warnings if "plain loss runs" in w.message]


def test_a_huge_context_parallel_mask_is_a_warning(tmp_path: Path) -> None:
    text = MINIMAL + "context_parallel_size: 2\nsequence_len: 131072\n"
    compilation = compile_config(write(tmp_path / "c.yml", text), gpus(2))
    (warning,) = [w for w in compilation.plan.warnings if w.path == ("context_parallel_size",)]
    assert "attention mask needs ~24 GiB per GPU" in warning.message


# --- what tunefile cannot carry out: one located error each ----------------------------------------------------

@pytest.mark.parametrize("extra, options, expected", [
    ("dp_shard_size: 2\ndp_replicate_size: 2\ntensor_parallel_size: 2\n" + FSDP2, gpus(4),
     "c.yml:6: dp_replicate_size: dp_replicate_size 2 × dp_shard_size 2 × tensor_parallel_size 2 × "
     "context_parallel_size 1 = 8 GPUs; the target has 4 GPU(s)"),
    ("context_parallel_size: 3\n", gpus(4),
     "c.yml:5: context_parallel_size: tensor_parallel_size 1 × context_parallel_size 3 does not divide the GPUs"),
    ("context_parallel_size: 2\nattn_implementation: eager\n", gpus(2),
     "c.yml:5: context_parallel_size: context parallelism runs its own attention"),
    ("tensor_parallel_size: 2\nadapter: lora\n" + FSDP2, gpus(4),
     "c.yml:5: tensor_parallel_size: tensor parallelism splits full 16/32-bit weights"),
    ("tensor_parallel_size: 2\nadapter: qlora\n" + FSDP2, gpus(4),
     "c.yml:5: tensor_parallel_size: tensor parallelism splits full 16/32-bit weights"),
    ("tensor_parallel_size: 2\ndeepspeed: zero3\n", gpus(4),
     "c.yml:5: tensor_parallel_size: tensor parallelism with DeepSpeed is DeepSpeed's AutoTP"),
    ("tensor_parallel_size: 2\nstrategy: ddp\n", gpus(4),
     "c.yml:5: tensor_parallel_size: tunefile runs tensor parallelism inside FSDP2"),
    ("tensor_parallel_size: 2\n" + FSDP2, gpus(2),
     "c.yml:5: tensor_parallel_size: tensor_parallel_size 2 leaves FSDP2 no GPUs to shard across"),
    ("tensor_parallel_size: 2\nliger_rms_norm: true\nplugins: [axolotl.integrations.liger.LigerPlugin]\n" + FSDP2,
     gpus(4),
     "c.yml:6: liger_rms_norm: Liger's kernels read whole weights"),
    ("tensor_parallel_size: 2\ntiled_mlp: true\n" + FSDP2, gpus(4),
     "c.yml:6: tiled_mlp: tiled MLP runs the MLP over slices of the sequence on whole weights"),
    ("tensor_parallel_size: 2\noptimizer: adamw_8bit\n" + FSDP2, gpus(4),
     "c.yml:6: optimizer: adamw_8bit (bitsandbytes) cannot update tensor-parallel weights"),
    ("tensor_parallel_size: 2\nfsdp_version: 2\nfsdp_config:\n  cpu_ram_efficient_loading: true\n", gpus(4),
     "c.yml:8: fsdp_config.cpu_ram_efficient_loading: with tensor parallelism every GPU loads the weights"),
    ("dp_shard_size: 2\ndp_replicate_size: 2\nfsdp_config:\n  auto_wrap_policy: TRANSFORMER_BASED_WRAP\n",
     gpus(4), "c.yml:8: fsdp_config: N-D parallelism (HSDP, tensor or context parallelism) runs on FSDP2"),
    ("dp_shard_size: 2\nstrategy: ddp\n", gpus(4),
     "c.yml:5: dp_shard_size: dp_shard_size 2 shards the model with FSDP, and this config trains with ddp"),
    ("dp_replicate_size: 2\nstrategy: ddp\n", gpus(4),
     "c.yml:5: dp_replicate_size: dp_replicate_size 2 leaves groups of 2 GPUs, which FSDP would shard"),
    ("dp_replicate_size: 2\ncontext_parallel_size: 2\ndp_shard_size: 1\n" + FSDP2, gpus(4),
     "c.yml:5: dp_replicate_size: accelerate composes tensor and context parallelism with FSDP2 shards"),
    ("tensor_parallel_size: 2\n" + FSDP2, TargetOptions(target="cpu", gpus_per_node=4),
     "c.yml:5: tensor_parallel_size: tensor parallelism runs inside FSDP2, which accelerate starts on GPUs only"),
])
def test_what_cannot_be_carried_out_is_one_located_error(tmp_path: Path, extra: str, options: TargetOptions,
                                                         expected: str) -> None:
    (line,) = errors_of(tmp_path, MINIMAL + extra, options)
    assert line.startswith(expected), line


def test_tensor_parallel_size_must_divide_a_known_models_heads(tmp_path: Path) -> None:
    text = local_model(tmp_path) + FSDP2 + "tensor_parallel_size: 4\n"
    (line,) = errors_of(tmp_path, text, gpus(8))
    assert line == "c.yml:8: tensor_parallel_size: tensor_parallel_size 4 does not divide the model's 2 " \
                   "key/value heads"


def test_tensor_parallelism_refuses_a_known_model_with_tied_embeddings(tmp_path: Path) -> None:
    text = local_model(tmp_path, tie_word_embeddings=True) + FSDP2 + "tensor_parallel_size: 2\n"
    (line,) = errors_of(tmp_path, text, gpus(4))
    assert line.startswith("c.yml:8: tensor_parallel_size: tensor parallelism cannot split a model whose input "
                           "and output embeddings are tied")


def test_context_parallelism_refuses_a_known_hybrid_model(tmp_path: Path) -> None:
    text = local_model(tmp_path, architectures=["NemotronHForCausalLM"]) + "context_parallel_size: 2\n"
    (line,) = errors_of(tmp_path, text, gpus(2))
    assert line.startswith("c.yml:5: context_parallel_size: context parallelism: NemotronHForCausalLM has layers "
                           "that mix tokens outside attention")


def test_a_known_model_that_divides_compiles(tmp_path: Path) -> None:
    text = local_model(tmp_path) + FSDP2 + "tensor_parallel_size: 2\n"
    assert parallelism(plan_of(tmp_path, text, gpus(4)))["tensor_parallel_size"] == 2


# --- the run plan's invariant ---------------------------------------------------------------------------------

def test_the_run_plan_refuses_an_inconsistent_parallelism_section(tmp_path: Path) -> None:
    plan = plan_of(tmp_path, MINIMAL + FSDP2 + "tensor_parallel_size: 2\n", gpus(4))
    check_invariants(parse_run_plan(plan))
    mesh = plan["distribution"]["parallelism"]
    broken = [
        ({**mesh, "dp_shard_size": 4}, "fsdp", "is not world_size"),
        ({**mesh, "tensor_parallel_size": 1, "dp_shard_size": 4}, "fsdp", "present only with tensor or context"),
        (mesh, "ddp", "need strategy fsdp"),
    ]
    for section, strategy, message in broken:
        distribution = {k: v for k, v in plan["distribution"].items() if k != "fsdp"} if strategy == "ddp" else \
            plan["distribution"]
        with pytest.raises(RunPlanError, match=message):
            parse_run_plan({**plan, "distribution": {**distribution, "strategy": strategy, "parallelism": section}})
