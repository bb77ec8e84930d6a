"""The compiler's half of the Axolotl features run plan version 3 adds: each key lands in the plan with Axolotl's
defaults filled in, and each misuse Axolotl forbids (or would silently ignore) is one located error.

The runtime's half (what each plan field does while training) is tested in tests/test_runtime_*.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from compile_helpers import compiled, plan_of, problems_of

from helpers import MINIMAL
from tunefile.compiler.errors import ConfigError
from tunefile.compiler.loader import load_document
from tunefile.compiler.pipeline import TargetOptions
from tunefile.compiler.validate import validate_with_notes

LORA = MINIMAL + "adapter: lora\n"


# --- ReLoRA -------------------------------------------------------------------------------------------------

def test_relora_takes_axolotls_defaults(tmp_path: Path) -> None:
    relora = plan_of(tmp_path, LORA + "relora: true\njagged_restart_steps: 150\n")["model"]["relora"]
    assert relora == {"restart_steps": 150, "warmup_steps": 10, "anneal_steps": 1, "min_lr_scale": 0.001,
                      "prune_ratio": 0.9, "prune_method": "magnitude", "cpu_offload": False}


def test_relora_reset_prunes_nearly_everything_and_reads_false_as_zero(tmp_path: Path) -> None:
    text = LORA + ("relora: true\njagged_restart_steps: 50\njagged_restart_anneal_steps: false\n"
                   "jagged_restart_warmup_steps: 5\nrelora_prune_method: reset\ncosine_min_lr_ratio: 0.1\n")
    relora = plan_of(tmp_path, text)["model"]["relora"]
    # Axolotl's `anneal or 1`: false reads as 0, which means the default.
    assert (relora["anneal_steps"], relora["warmup_steps"]) == (1, 5)
    assert (relora["prune_method"], relora["prune_ratio"], relora["min_lr_scale"]) == ("reset", 0.999, 0.1)
    _, _, notes = validate_with_notes(load_document(text, "c.yml"))
    assert any(note.path == ("jagged_restart_anneal_steps",) and note.message == "read as 0" for note in notes)


@pytest.mark.parametrize("text, expected", [
    (MINIMAL + "relora: true\njagged_restart_steps: 10\n", "relora: ReLoRA restarts a LoRA adapter"),
    (LORA + "relora: true\n", "relora: ReLoRA needs jagged_restart_steps"),
    (LORA + "jagged_restart_steps: 10\n", "jagged_restart_steps: tunefile applies jagged learning-rate restarts"),
    (LORA + "relora: true\njagged_restart_steps: 10\nfsdp_config:\n  fsdp_version: 2\n",
     "relora: ReLoRA merges into whole weights: it cannot run under FSDP or DeepSpeed"),
    (LORA + "relora: true\njagged_restart_steps: 10\ndeepspeed: zero2\n", "it cannot run under FSDP or DeepSpeed"),
])
def test_relora_misuse_is_one_located_error(text: str, expected: str) -> None:
    (line,) = problems_of(text)
    assert expected in line and line.startswith("c.yml:")


# --- LISA ---------------------------------------------------------------------------------------------------

def test_lisa_lands_in_the_plan(tmp_path: Path) -> None:
    model = plan_of(tmp_path, MINIMAL + "lisa_n_layers: 4\nlisa_step_interval: 20\n")["model"]
    assert model["lisa"] == {"n_layers": 4, "step_interval": 20, "layers_attribute": "model.layers"}
    assert "lisa" not in plan_of(tmp_path, MINIMAL)["model"]


@pytest.mark.parametrize("text, expected", [
    (MINIMAL + "lisa_n_layers: 4\n", "lisa_n_layers: LISA needs both lisa_n_layers and lisa_step_interval; "
                                     "lisa_step_interval is missing"),
    (LORA + "lisa_n_layers: 4\nlisa_step_interval: 5\n", "lisa_n_layers: LISA trains whole decoder layers"),
    (MINIMAL + "lisa_n_layers: 4\nlisa_step_interval: 5\ndeepspeed: zero3\n", "LISA switches requires_grad"),
])
def test_lisa_misuse_is_one_located_error(text: str, expected: str) -> None:
    (line,) = problems_of(text)
    assert line.startswith("c.yml:") and expected in line


# --- LoftQ --------------------------------------------------------------------------------------------------

def test_loftq_bits_land_in_the_lora_plan(tmp_path: Path) -> None:
    lora = plan_of(tmp_path, LORA + "peft:\n  loftq_config:\n    loftq_bits: 4\n")["model"]["lora"]
    assert lora["loftq_bits"] == 4
    assert plan_of(tmp_path, LORA)["model"]["lora"]["loftq_bits"] is None


def test_loftq_needs_an_unquantised_lora_base() -> None:
    (line,) = problems_of(MINIMAL + "adapter: qlora\npeft:\n  loftq_config:\n    loftq_bits: 4\n")
    assert "peft.loftq_config: LoftQ initialises a LoRA adapter on the unquantised base" in line


# --- pure half-precision weights ----------------------------------------------------------------------------

def test_bfloat16_is_bf16_with_half_precision_weights(tmp_path: Path) -> None:
    files = compiled(tmp_path, MINIMAL + "bfloat16: true\n")
    model = yaml.safe_load(files["config.yaml"])["model"]
    assert (model["precision"], model["half_precision_weights"]) == ("bf16", True)
    assert yaml.safe_load(files["accelerate.yaml"])["mixed_precision"] == "bf16"


def test_float16_trains_without_a_loss_scaler(tmp_path: Path) -> None:
    files = compiled(tmp_path, MINIMAL + "float16: true\n")
    model = yaml.safe_load(files["config.yaml"])["model"]
    assert (model["precision"], model["half_precision_weights"]) == ("fp16", True)
    # accelerate's fp16 mode would add a GradScaler, which refuses float16 parameters.
    assert yaml.safe_load(files["accelerate.yaml"])["mixed_precision"] == "no"
    assert yaml.safe_load(compiled(tmp_path, MINIMAL + "fp16: true\n")["accelerate.yaml"])["mixed_precision"] == "fp16"


def test_half_precision_weights_contradicting_mixed_precision_are_errors() -> None:
    assert "bfloat16 weights contradict fp16: true" in problems_of(MINIMAL + "bfloat16: true\nfp16: true\n")[0]
    assert "float16 weights contradict bf16: true" in problems_of(MINIMAL + "float16: true\nbf16: true\n")[0]


def test_float16_weights_need_a_gpu(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        compiled(tmp_path, MINIMAL + "float16: true\n", TargetOptions(target="cpu"))
    assert "float16 weights need a GPU" in str(caught.value.problems[0].message)


# --- data: streaming SFT, deduplication, grouping, formats ---------------------------------------------------

def test_streamed_sft_datasets_have_no_cache_and_no_eval_split(tmp_path: Path) -> None:
    data = plan_of(tmp_path, MINIMAL + "streaming: true\nmax_steps: 100\nval_set_size: 0.1\n")["data"]
    assert (data["streaming"], data["skip_prepare"], data["val_set_size"]) == (True, True, 0.0)
    (line,) = problems_of(MINIMAL + "streaming: true\n")
    assert line.startswith("c.yml:5:12: streaming: streamed datasets need max_steps")


def test_deduplication_and_length_grouping_land_in_the_plan(tmp_path: Path) -> None:
    data = plan_of(tmp_path, MINIMAL + "dataset_exact_deduplication: true\ngroup_by_length: true\n")["data"]
    assert (data["exact_deduplication"], data["group_by_length"]) == (True, True)
    # With packing every row is sequence_len long: Axolotl's sampler does not group then, nor does tunefile.
    packed = plan_of(tmp_path, MINIMAL + "group_by_length: true\nsample_packing: true\n")["data"]
    assert packed["group_by_length"] is False


@pytest.mark.parametrize("kind", ["alpaca:chat", "alpaca:phi", "jeopardy"])
def test_axolotls_other_instruction_formats_compile(tmp_path: Path, kind: str) -> None:
    text = f"base_model: m\ndatasets:\n  - path: data/x.jsonl\n    type: {kind}\n"
    assert plan_of(tmp_path, text)["data"]["datasets"][0]["type"] == kind


# --- trackers -----------------------------------------------------------------------------------------------

def test_swanlab_follows_axolotls_switches(tmp_path: Path) -> None:
    on = plan_of(tmp_path, MINIMAL + "use_swanlab: true\nswanlab_project: p\nswanlab_mode: local\n")
    assert on["trackers"]["swanlab"] == {"project": "p", "experiment_name": None, "description": None,
                                         "workspace": None, "mode": "local"}
    # Naming a project turns it on; offline: true always keeps it off the network; disabled turns it off.
    assert plan_of(tmp_path, MINIMAL + "swanlab_project: p\noffline: true\n")["trackers"]["swanlab"]["mode"] == \
        "offline"
    assert "swanlab" not in plan_of(tmp_path, MINIMAL + "swanlab_project: p\nswanlab_mode: disabled\n")["trackers"]
    assert "swanlab" not in plan_of(tmp_path, MINIMAL + "swanlab_project: p\nuse_swanlab: false\n")["trackers"]


def test_the_swanlab_plugin_is_accepted(tmp_path: Path) -> None:
    text = MINIMAL + "plugins:\n  - axolotl.integrations.swanlab.SwanLabPlugin\nuse_swanlab: true\n"
    assert plan_of(tmp_path, text)["trackers"]["swanlab"]["project"] == "tunefile"


def test_otel_metrics_take_axolotls_address(tmp_path: Path) -> None:
    assert plan_of(tmp_path, MINIMAL + "use_otel_metrics: true\n")["trackers"]["otel"] == {"host": "localhost",
                                                                                         "port": 8000}
    assert "otel" not in plan_of(tmp_path, MINIMAL)["trackers"]


# --- models and optimizers ----------------------------------------------------------------------------------

def test_llama4_linearized_experts_and_muon_land_in_the_plan(tmp_path: Path) -> None:
    plan = plan_of(tmp_path, MINIMAL + "llama4_linearized_experts: true\noptimizer: muon\n")
    assert plan["model"]["llama4_linearized_experts"] is True and plan["optimizer"]["name"] == "muon"


def test_a_pretraining_config_with_another_error_reports_only_that_error() -> None:
    # The rules run on the valid part with placeholders for the broken keys; a datasets placeholder must not
    # then contradict pretraining_dataset.
    text = "base_model: m\npretraining_dataset:\n  - path: c4\nmax_steps: 10\noptimizer: sgd_of_my_own\n"
    (line,) = problems_of(text)
    assert line.startswith("c.yml:5:12: optimizer: expected one of")


# --- wave two: fp8, tiled MLP, per-layer-embedding offload, ternary QAT, quadratic warm-up, device_map ------

def test_fp8_lands_in_the_plan_on_hopper_and_is_refused_before_it(tmp_path: Path) -> None:
    text = MINIMAL + "fp8: true\nfp8_enable_fsdp_float8_all_gather: true\n"
    assert plan_of(tmp_path, text)["model"]["fp8"] == {"recipe": "tensorwise", "fsdp_float8_all_gather": True}
    rowwise = MINIMAL + "fp8: true\nfp8_config:\n  recipe: rowwise\n"
    assert plan_of(tmp_path, rowwise)["model"]["fp8"] == {"recipe": "rowwise", "fsdp_float8_all_gather": False}
    with pytest.raises(ConfigError) as caught:
        compiled(tmp_path, MINIMAL + "fp8: true\n", TargetOptions(gpu="a100-80gb"))
    assert "FP8 training needs compute capability 8.9 or newer (Ada, Hopper); a100-80gb is 8.0" in \
        caught.value.problems[0].message
    (line,) = problems_of(MINIMAL + "fp8_enable_fsdp_float8_all_gather: true\n")
    assert "float8 all-gather needs fp8: true" in line


def test_tiled_mlp_and_ple_offload_land_in_the_plan(tmp_path: Path) -> None:
    model = plan_of(tmp_path, MINIMAL + "tiled_mlp: true\n")["model"]
    assert model["tiled_mlp"] == {"num_shards": None, "use_original_mlp": True}
    qlora = plan_of(tmp_path, MINIMAL + "adapter: qlora\nple_cpu_offload: true\n")["model"]
    assert qlora["ple_cpu_offload"] is True
    (line,) = problems_of(MINIMAL + "adapter: lora\nple_cpu_offload: true\n")
    assert "ple_cpu_offload needs a quantised base under an adapter" in line


def test_ternary_qat_compiles_with_its_embedding(tmp_path: Path) -> None:
    text = MINIMAL + "qat:\n  weight_dtype: ternary\n  activation_dtype: int8\n  quantize_embedding: true\n"
    qat = plan_of(tmp_path, text)["model"]["qat"]
    assert (qat["weight_dtype"], qat["activation_dtype"], qat["quantize_embedding"]) == ("ternary", "int8", True)
    assert "cannot fake-quantise weights ternary with activations int4" in \
        problems_of(MINIMAL + "qat:\n  weight_dtype: ternary\n  activation_dtype: int4\n")[0]


def test_quadratic_warmup_is_axolotls_cosine_variant(tmp_path: Path) -> None:
    schedule = plan_of(tmp_path, MINIMAL + "lr_scheduler: cosine\nlr_quadratic_warmup: true\n"
                                           "cosine_min_lr_ratio: 0.1\n")["schedule"]
    # Axolotl's quadratic-warm-up cosine has no floor: the min-lr ratio is dropped, with a warning.
    assert (schedule["warmup_shape"], schedule["min_lr_ratio"]) == ("quadratic", 0.0)
    linear = plan_of(tmp_path, MINIMAL + "lr_scheduler: linear\nlr_quadratic_warmup: true\n")["schedule"]
    assert linear["warmup_shape"] == "linear"


def test_min_sample_len_defaults_to_axolotls_two_tokens(tmp_path: Path) -> None:
    assert plan_of(tmp_path, MINIMAL)["data"]["min_sample_len"] == 2
    assert plan_of(tmp_path, MINIMAL + "min_sample_len: 64\n")["data"]["min_sample_len"] == 64


def test_device_map_auto_means_nothing_more_on_one_gpu(tmp_path: Path) -> None:
    compiled(tmp_path, MINIMAL + "device_map: auto\n", TargetOptions(gpu="h100-80gb", gpus_per_node=1))
    with pytest.raises(ConfigError) as caught:
        compiled(tmp_path, MINIMAL + "device_map: auto\n", TargetOptions(gpu="h100-80gb", gpus_per_node=2))
    assert caught.value.problems[0].message.startswith("device_map: auto spreads one model copy over 2 processes'")


@pytest.mark.parametrize("text, where", [
    (MINIMAL + "optimizer: muon\ndeepspeed: zero2\n", "DeepSpeed"),
    (MINIMAL + "optimizer: muon\nfsdp_config:\n  offload_params: false\n", "FSDP1"),
])
def test_muon_needs_whole_matrices(text: str, where: str) -> None:
    (line,) = problems_of(text)
    assert f"muon orthogonalises whole weight matrices; {where} hands the optimizer flattened 1-D shards" in line


def test_muon_runs_under_fsdp2(tmp_path: Path) -> None:
    text = MINIMAL + "optimizer: muon\nfsdp_config:\n  fsdp_version: 2\n"
    plan = plan_of(tmp_path, text, TargetOptions(gpu="h100-80gb", gpus_per_node=2))
    assert plan["optimizer"]["name"] == "muon" and plan["distribution"]["strategy"] == "fsdp"


def test_llama4_router_is_no_lora_target() -> None:
    (line,) = problems_of(MINIMAL + "adapter: lora\nlora_target_linear: true\nllama4_linearized_experts: true\n")
    assert "the MoE router, an nn.Linear that returns a pair" in line


def test_float16_full_fine_tuning_with_adamw_warns(tmp_path: Path) -> None:
    _, warnings, _ = validate_with_notes(load_document(MINIMAL + "float16: true\noptimizer: adamw_torch\n", "c.yml"))
    assert any(w.path == ("float16",) and "epsilon (1e-8) rounds to 0" in w.message for w in warnings)
    _, quiet, _ = validate_with_notes(load_document(MINIMAL + "float16: true\noptimizer: adamw_bnb_8bit\n", "c.yml"))
    assert not any(w.path == ("float16",) for w in quiet)


def test_fp8_combinations_accelerate_and_torchao_refuse() -> None:
    line, = problems_of(MINIMAL + "fp8: true\nfp8_enable_fsdp_float8_all_gather: true\n"
                                  "fp8_config:\n  recipe: rowwise\n")
    assert "float8 all-gather works with the tensorwise recipe only, not rowwise" in line
    line, = problems_of(MINIMAL + "fp8: true\nfsdp_config:\n  fsdp_version: 2\n  cpu_ram_efficient_loading: true\n")
    assert "fsdp_config.cpu_ram_efficient_loading: accelerate cannot convert a model to float8" in line


def test_sequence_parallel_degree_is_context_parallel_size(tmp_path: Path) -> None:
    text = MINIMAL + "sequence_parallel_degree: 2\nattn_implementation: sdpa\nfsdp_config:\n  fsdp_version: 2\n"
    plan = plan_of(tmp_path, text, TargetOptions(gpu="h100-80gb", gpus_per_node=4))
    assert plan["distribution"]["parallelism"]["context_parallel_size"] == 2


def test_tensor_and_context_parallel_gpus_share_their_micro_batches(tmp_path: Path) -> None:
    text = MINIMAL + ("attn_implementation: sdpa\ntensor_parallel_size: 2\ncontext_parallel_size: 2\n"
                      "micro_batch_size: 3\nfsdp_config:\n  fsdp_version: 2\n")
    files = compiled(tmp_path, text, TargetOptions(gpu="h100-80gb", gpus_per_node=8))
    assert "3 micro batch × 1 accumulation × 2 data-parallel groups of 4 GPUs = 6 sequences per optimizer step" \
        in files["accelerate.yaml"]
