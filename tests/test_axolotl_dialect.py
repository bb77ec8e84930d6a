"""Axolotl's dialect as Axolotl documents it today: configs people already have compile, and mean what they meant.

The stock-DeepSpeed tests compare with the files in Axolotl's own source release, fetched from the package index
(as CI can); the version is the one the dialect follows (compiler/dialect/axolotl_keys.json).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml
from compile_helpers import compiled, plan_of, problems_of

from helpers import MINIMAL, run_cli, write
from tunefile.compiler.dialect.normalize import axolotl_catalogue
from tunefile.compiler.dialect.stock_deepspeed import STOCK_DEEPSPEED
from tunefile.compiler.dialect.table import NO_EFFECT, REFUSED
from tunefile.compiler.errors import ConfigError
from tunefile.compiler.loader import load_document
from tunefile.compiler.pipeline import TargetOptions, compile_config
from tunefile.compiler.spec import Spec
from tunefile.compiler.validate import validate_document, validate_with_notes

# --- empty means default ------------------------------------------------------------------------------------

EMPTY_KEYS = """\
dataset_prepared_path:
fp16:
lora_r:
lora_alpha:
lora_target_linear:
lora_model_dir:
wandb_project:
wandb_entity:
wandb_watch:
wandb_name:
wandb_log_model:
resume_from_checkpoint:
special_tokens:
fsdp:
fsdp_config:
deepspeed:
evals_per_epoch:
tf32:
"""


def test_empty_values_mean_the_default_at_every_depth(tmp_path: Path) -> None:
    plain = MINIMAL + "adapter: lora\n"
    with_empty = plain + EMPTY_KEYS + "gradient_checkpointing_kwargs:\n  use_reentrant:\n"
    assert plan_of(tmp_path, with_empty) == plan_of(tmp_path, plain)


def test_an_empty_lora_model_dir_without_an_adapter_is_no_adapter_request(tmp_path: Path) -> None:
    """`lora_model_dir:` left empty used to count as set and trip the "needs an adapter" rule."""
    spec, warnings = validate_document(load_document(MINIMAL + "lora_model_dir:\nlora_r:\n", "c.yml"))
    assert spec.lora_model_dir is None and warnings == []


def test_an_empty_dataset_type_is_pretokenized() -> None:
    spec, _ = validate_document(load_document("base_model: m\ndatasets:\n  - path: tokens.jsonl\n    type:\n",
                                              "c.yml"))
    assert spec.datasets[0].type == "pretokenized"


# --- today's spellings and the deprecated ones ----------------------------------------------------------------

@pytest.mark.parametrize("legacy, current", [
    ("flash_attention: true\n", "attn_implementation: flash_attention_2\n"),
    ("sdp_attention: true\n", "attn_implementation: sdpa\n"),
    ("eager_attention: true\n", "attn_implementation: eager\n"),
    ("xformers_attention: true\n", "attn_implementation: xformers\n"),
])
def test_legacy_attention_flags_mean_attn_implementation(tmp_path: Path, legacy: str, current: str) -> None:
    assert plan_of(tmp_path, MINIMAL + legacy) == plan_of(tmp_path, MINIMAL + current)


@pytest.mark.parametrize("value, gpu, runs", [
    ("flash_attention_2", "h100-80gb", "flash_attention_2"),
    ("flash_attention_2", "v100-32gb", "sdpa"),
    ("flash_attention_3", "h100-80gb", "flash_attention_2"),
    ("sdpa", "h100-80gb", "sdpa"),
    ("eager", "h100-80gb", "eager"),
    ("flex_attention", "h100-80gb", "sdpa"),
    ("xformers", "h100-80gb", "sdpa"),
    ("kernels-community/vllm-flash-attn3", "h100-80gb", "flash_attention_2"),
    ("kernels-community/vllm-flash-attn3", "t4", "sdpa"),
])
def test_every_attn_implementation_resolves_with_its_reason(tmp_path: Path, value: str, gpu: str, runs: str) -> None:
    plan = compile_config(write(tmp_path / "c.yml", MINIMAL + f"attn_implementation: {value}\n"),
                          TargetOptions(gpu=gpu)).plan
    assert plan.attention == runs
    (decision,) = [d for d in plan.decisions if d.topic == "attention"]
    assert decision.value == runs and value in decision.reason


def test_message_property_mappings_and_the_older_keys_mean_the_same(tmp_path: Path) -> None:
    head = "base_model: m\ndatasets:\n  - path: chat.jsonl\n    type: chat_template\n"
    current = plan_of(tmp_path, head + "    message_property_mappings:\n      role: from\n      content: value\n")
    legacy = plan_of(tmp_path, head + "    message_field_role: from\n    message_field_content: value\n")
    assert current == legacy
    dataset = current["data"]["datasets"][0]
    assert dataset["message_field_role"] == "from" and dataset["message_field_content"] == "value"


def test_fsdp_prefixed_keys_are_the_plain_ones(tmp_path: Path) -> None:
    options = TargetOptions(gpu="h100-80gb", gpus_per_node=4)
    plain = plan_of(tmp_path, MINIMAL + "fsdp_version: 2\nfsdp_config:\n  offload_params: true\n"
                    "  state_dict_type: SHARDED_STATE_DICT\n  transformer_layer_cls_to_wrap: LlamaDecoderLayer\n",
                    options)
    prefixed = plan_of(tmp_path, MINIMAL + "fsdp_config:\n  fsdp_version: 2\n  fsdp_offload_params: true\n"
                       "  fsdp_state_dict_type: SHARDED_STATE_DICT\n"
                       "  fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer\n", options)
    assert prefixed == plain
    assert plain["distribution"]["fsdp"]["version"] == 2 and plain["distribution"]["fsdp"]["offload_params"] is True


def test_a_problem_in_a_rewritten_key_points_at_the_line_the_user_wrote() -> None:
    (line,) = problems_of(MINIMAL + "fsdp_config:\n  fsdp_offload_params: sometimes\n")
    assert line.startswith("c.yml:6:24: fsdp_config.fsdp_offload_params: expected true or false")


# --- FSDP without a version is FSDP1, as in Axolotl ------------------------------------------------------------

def test_fsdp_config_without_a_version_is_fsdp1(tmp_path: Path) -> None:
    text = MINIMAL + "fsdp:\n  - full_shard\n  - auto_wrap\nfsdp_config:\n  fsdp_offload_params: true\n" \
        "  fsdp_transformer_layer_cls_to_wrap: LlamaDecoderLayer\n"
    compilation = compile_config(write(tmp_path / "c.yml", text), TargetOptions(gpu="h100-80gb", gpus_per_node=4))
    accelerate = yaml.safe_load(compilation.files["accelerate.yaml"])
    assert accelerate["distributed_type"] == "FSDP"
    assert accelerate["fsdp_config"]["fsdp_version"] == 1
    assert accelerate["fsdp_config"]["fsdp_sharding_strategy"] == "FULL_SHARD"
    assert accelerate["fsdp_config"]["fsdp_offload_params"] is True
    assert yaml.safe_load(compilation.files["config.yaml"])["distribution"]["fsdp"]["version"] == 1
    (strategy,) = [d for d in compilation.plan.decisions if d.topic == "strategy"]
    assert strategy.value == "fsdp1" and "without fsdp_version is FSDP1, as in Axolotl" in strategy.reason


def test_shard_grad_op_is_fsdp1_without_resharding(tmp_path: Path) -> None:
    text = MINIMAL + "fsdp_config:\n  sharding_strategy: SHARD_GRAD_OP\n"
    accelerate = yaml.safe_load(compiled(tmp_path, text, TargetOptions(gpu="h100-80gb", gpus_per_node=2))[
        "accelerate.yaml"])
    assert accelerate["fsdp_config"]["fsdp_sharding_strategy"] == "SHARD_GRAD_OP"


def test_fsdp_that_tunefile_picks_itself_stays_fsdp2(tmp_path: Path) -> None:
    plan = plan_of(tmp_path, MINIMAL + "strategy: fsdp\n", TargetOptions(gpu="h100-80gb", gpus_per_node=2))
    assert plan["distribution"]["fsdp"]["version"] == 2


# --- Axolotl's stock DeepSpeed files ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def axolotl_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Axolotl's source release at the version the dialect follows, from the package index."""
    version = axolotl_catalogue().version
    cache = Path(os.environ.get("TUNEFILE_AXOLOTL_CACHE", Path.home() / ".cache" / "tunefile"))
    tree = cache / f"axolotl-{version}"
    if not (tree / "deepspeed_configs").is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        fetched = subprocess.run([sys.executable, "-m", "pip", "download", f"axolotl=={version}", "--no-deps",
                                  "--no-binary", ":all:", "-d", str(cache)], capture_output=True, text=True)
        if fetched.returncode != 0:
            message = f"cannot fetch Axolotl {version}'s source release: {fetched.stderr[-300:]}"
            if os.environ.get("CI") == "true":
                pytest.fail(message)
            pytest.skip(message)
        with tarfile.open(cache / f"axolotl-{version}.tar.gz") as archive:
            archive.extractall(cache, filter="data")
    return tree


def test_the_stock_files_tunefile_knows_are_axolotls(axolotl_release: Path) -> None:
    folder = axolotl_release / "deepspeed_configs"
    released = {path.name: json.loads(path.read_text()) for path in folder.glob("*.json")}
    assert STOCK_DEEPSPEED == released


@pytest.mark.parametrize("name", sorted(STOCK_DEEPSPEED))
def test_a_stock_deepspeed_name_compiles_to_what_axolotl_runs(tmp_path: Path, axolotl_release: Path,
                                                              name: str) -> None:
    """Naming the stock file without having it gives the bundle that having Axolotl's file beside the config
    gives: same deepspeed.json, same stage and offload (zero2.json offloads the optimizer state)."""
    options = TargetOptions(gpu="h100-80gb", gpus_per_node=2)
    body = MINIMAL + "adapter: lora\nbf16: true\n"
    stock = compiled(tmp_path / "stock", body + f"deepspeed: deepspeed_configs/{name}\n", options)
    beside = tmp_path / "beside"
    write(beside / "deepspeed_configs" / name, (axolotl_release / "deepspeed_configs" / name).read_text())
    user = compiled(beside, body + f"deepspeed: deepspeed_configs/{name}\n", options)
    assert json.loads(stock["deepspeed.json"]) == json.loads(user["deepspeed.json"])
    config = json.loads(stock["deepspeed.json"])
    zero = config["zero_optimization"]
    released = json.loads((axolotl_release / "deepspeed_configs" / name).read_text())
    assert zero["stage"] == released["zero_optimization"]["stage"]
    for offload in ("offload_optimizer", "offload_param"):
        assert (offload in zero) == (offload in released["zero_optimization"])
    assert ("compile" in config) == name.endswith("_torch_compile.json")
    assert '"auto"' not in json.dumps(config)  # every "auto" value filled in


def test_zero2_json_is_not_the_zero2_preset(tmp_path: Path) -> None:
    """The hint of old sent zero2.json to the zero2 preset, which keeps the optimizer on the GPU."""
    options = TargetOptions(gpu="h100-80gb", gpus_per_node=2)
    stock = json.loads(compiled(tmp_path, MINIMAL + "deepspeed: deepspeed_configs/zero2.json\n", options)[
        "deepspeed.json"])
    preset = json.loads(compiled(tmp_path, MINIMAL + "deepspeed: zero2\n", options)["deepspeed.json"])
    assert stock["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "offload_optimizer" not in preset["zero_optimization"]


@pytest.mark.parametrize("deepspeed", ["deepspeed_configs/zero3.json", "zero3"])
def test_unsized_bucket_defaults_are_said(tmp_path: Path, deepspeed: str) -> None:
    text = "base_model: some/unknown-model\ndatasets:\n  - path: d.jsonl\n    type: alpaca\n" \
           f"deepspeed: {deepspeed}\n"
    plan = compile_config(write(tmp_path / "c.yml", text), TargetOptions(gpu="h100-80gb", gpus_per_node=2)).plan
    (strategy,) = [d for d in plan.decisions if d.topic == "strategy"]
    assert "bucket sizes are DeepSpeed's defaults" in strategy.reason


# --- Axolotl's defaults ----------------------------------------------------------------------------------------

def test_axolotls_defaults(tmp_path: Path) -> None:
    plan = plan_of(tmp_path, MINIMAL)
    assert plan["model"]["tf32"] is True  # tf32: auto on an H100
    assert plan["data"]["sequence_len"] == 512
    assert plan["checkpointing"]["output_dir"] == "./model-out"
    assert plan["checkpointing"]["auto_resume"] is False
    assert (plan["schedule"]["warmup_ratio"], plan["schedule"]["warmup_max_steps"]) == (0.03, 100)
    assert plan["model"]["gradient_checkpointing_kwargs"] == {"use_reentrant": True}
    assert plan_of(tmp_path, MINIMAL, TargetOptions(gpu="v100-32gb"))["model"]["tf32"] is False


def test_evals_per_epoch_zero_means_no_evaluation(tmp_path: Path) -> None:
    plan = plan_of(tmp_path, MINIMAL + "evals_per_epoch: 0\nval_set_size: 0.05\n")
    assert plan["schedule"]["evals_per_epoch"] is None and plan["schedule"]["eval_steps"] is None


def test_batch_size_is_read_as_gradient_accumulation(tmp_path: Path) -> None:
    plan = plan_of(tmp_path, MINIMAL + "micro_batch_size: 2\nbatch_size: 8\n")
    assert plan["schedule"]["gradient_accumulation_steps"] == 4


def test_batch_size_that_is_not_a_whole_number_is_refused_at_its_line() -> None:
    assert problems_of(MINIMAL + "batch_size: true\n") == ["c.yml:5:13: batch_size: expected a whole number (got true)"]


def test_a_switched_off_cadence_still_checks_the_keys_it_makes_moot(tmp_path: Path) -> None:
    """eval_strategy: no drops eval_steps, but only one eval_steps could hold: another is refused where it stands,
    as it is without the switch."""
    for switch, key in (("eval_strategy", "eval_steps"), ("evaluation_strategy", "evals_per_epoch"),
                        ("save_strategy", "save_steps")):
        (line,) = problems_of(MINIMAL + f"{switch}: 'no'\n{key}: often\n")  # unquoted, YAML reads no as false
        assert line == f"c.yml:6:{len(key) + 3}: {key}: expected a whole number (got 'often')"
    plan = plan_of(tmp_path, MINIMAL + "eval_strategy: 'no'\neval_steps: 10\nval_set_size: 0.05\n")
    assert plan["schedule"]["eval_steps"] is None


def test_an_unquoted_no_switches_the_cadence_off_too(tmp_path: Path) -> None:
    """`save_strategy: no` without quotes is YAML's false; it means what the quoted one means."""
    plan = plan_of(tmp_path, MINIMAL + "eval_strategy: no\neval_steps: 10\nval_set_size: 0.05\n")
    assert plan["schedule"]["eval_steps"] is None


def test_an_unused_sequence_parallel_degree_is_checked_as_context_parallel_size() -> None:
    (line,) = problems_of(MINIMAL + "context_parallel_size: 2\nsequence_parallel_degree: 0\n")
    assert line == "c.yml:6:27: sequence_parallel_degree: must be greater than or equal to 1 (got 0)"
    _, _, notes = validate_with_notes(load_document(MINIMAL + "context_parallel_size: 2\nsequence_parallel_degree: 4\n",
                                                    "c.yml"))
    assert [(note.path, note.message) for note in notes] == [(("sequence_parallel_degree",), "no effect")]


@pytest.mark.parametrize("text, line", [
    ("lora_alpah:\n", "c.yml:5:1: lora_alpah: unknown key; did you mean lora_alpha?"),
    ("fsdp_config:\n  reshard_after_forwad:\n",
     "c.yml:6:3: fsdp_config.reshard_after_forwad: unknown key; did you mean reshard_after_forward?"),
    ("cluster_name:\n", "c.yml:5:1: cluster_name: unknown key"),
])
def test_an_unknown_key_left_empty_is_reported_as_unknown(text: str, line: str) -> None:
    assert problems_of(MINIMAL + text) == [line]


def test_an_unknown_dataset_key_left_empty_is_reported_as_unknown() -> None:
    assert problems_of("base_model: m\ndatasets:\n  - path: p.jsonl\n    type: alpaca\n    feild:\n") == [
        "c.yml:5:5: datasets[0].feild: unknown key; did you mean field?"]


# --- keys accepted without effect, refused with a reason, or out of scope --------------------------------------

def test_keys_without_effect_are_accepted_and_explain_says_so(tmp_path: Path) -> None:
    config = write(tmp_path / "c.yml", MINIMAL + "remove_unused_columns: false\nddp_find_unused_parameters: true\n"
                   "strict: false\nlora_mlp_kernel: true\n")
    code, out, _ = run_cli("explain", str(config))
    assert code == 0
    assert "axolotl remove_unused_columns" in out and "axolotl ddp_find_unused_parameters" in out
    assert out.count("no effect") == 4
    assert "command-line overrides" in out  # strict governs CLI overrides in Axolotl, not validation


def test_a_refused_feature_says_what_tunefile_does_instead() -> None:
    (line,) = problems_of(MINIMAL + "use_ray: true\n")
    assert line == "c.yml:5:1: use_ray: Axolotl's use_ray is not supported by tunefile: Ray is not supported; " \
                   "tunefile launches with accelerate (launch.sh) or SLURM (job.sbatch)"


def test_a_refused_feature_left_at_axolotls_default_is_accepted() -> None:
    _, warnings, notes = validate_with_notes(load_document(MINIMAL + "use_ray: false\nuse_eaft: false\n"
                                                           "expert_parallel_size: 1\n", "c.yml"))
    assert warnings == [] and {note.path for note in notes} == {("use_ray",), ("use_eaft",),
                                                                 ("expert_parallel_size",)}


@pytest.mark.parametrize("text, feature", [
    ("rl: dpo\n", "preference/RL training"),
    ("processor_type: AutoProcessor\n", "multimodal training"),
    ("reward_model: true\n", "reward-model training"),
])
def test_rl_and_multimodal_are_refused_in_one_line_naming_the_feature(tmp_path: Path, text: str,
                                                                      feature: str) -> None:
    # Along with keys that would each be a problem of their own: only the one line is shown.
    config = write(tmp_path / "c.yml", MINIMAL + text + "lora_r: many\nnot_a_key: 1\n")
    code, out, err = run_cli("compile", str(config), "-o", str(tmp_path / "bundle"))
    lines = [line for line in err.splitlines() if "error:" in line]
    assert code == 2 and len(lines) == 1 and feature in lines[0] and "Traceback" not in out + err
    assert not (tmp_path / "bundle").exists()


def test_a_dpo_dataset_type_is_refused_as_rl(tmp_path: Path) -> None:
    (line,) = problems_of("base_model: m\ndatasets:\n  - path: p.jsonl\n    type: dpo.chatml.intel\n")
    assert "preference/RL training" in line


def test_an_unknown_plugin_is_named(tmp_path: Path) -> None:
    (line,) = problems_of(MINIMAL + "plugins:\n  - axolotl.integrations.spectrum.SpectrumPlugin\n")
    assert "Spectrum layer selection" in line


# --- suggestions keep their meaning ----------------------------------------------------------------------------

def test_no_axolotl_key_is_ever_pointed_at_another_key() -> None:
    """Every key of Axolotl's schema tunefile does not take is refused (or accepted) by name, never answered
    with a "did you mean" towards some other key (save_strategy → strategy, eot_tokens → tokens, …)."""
    ours = {info.alias or name for name, info in Spec.model_fields.items()}
    for key in sorted(set(axolotl_catalogue().top_level) - ours):
        document = load_document(MINIMAL + f"{key}: [not, a, default]\n", "c.yml")
        try:
            validate_document(document)
        except ConfigError as error:
            for problem in error.problems:
                assert "did you mean" not in problem.message, (key, problem.message)


@pytest.mark.parametrize("typo, meant", [("sequence_length", "sequence_len"), ("micro_batch", "micro_batch_size"),
                                         ("lora_alpah", "lora_alpha"), ("adam_eps", "adam_epsilon")])
def test_real_typos_still_get_a_suggestion(typo: str, meant: str) -> None:
    (line,) = problems_of(MINIMAL + f"{typo}: 1\n")
    assert line.endswith(f"unknown key; did you mean {meant}?")


def test_an_unrelated_unknown_key_gets_no_suggestion() -> None:
    (line,) = problems_of(MINIMAL + "cluster_name: 1\n")
    assert "did you mean" not in line


def test_the_tables_only_name_axolotl_keys_tunefile_does_not_take() -> None:
    known = set(axolotl_catalogue().top_level)
    ours = {info.alias or name for name, info in Spec.model_fields.items()}
    for table in (NO_EFFECT, REFUSED):
        assert set(table) <= known and not set(table) & ours
