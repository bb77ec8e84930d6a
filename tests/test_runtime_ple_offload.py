"""ple_cpu_offload (runtime/ple_offload.py): the parameters a model lists in ``_no_placement_params`` stay in host
memory through loading, k-bit preparation, accelerate's prepare and DDP.

The model is the tiny Llama with a per-layer-embedding table added, a subclass that declares it in
``_no_placement_params`` and gathers its rows on the table's device (as Qwen's n-gram table does in transformers
5). The GPU is played by the meta device: the load map sends everything else there, and the table to the CPU.
bitsandbytes' 4-bit loading itself needs a GPU; here the parts around it are checked."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from runtime_plans import model_plan
from torch import nn

from tunefile.runtime import ple_offload
from tunefile.runtime.ple_offload import HostPlacement, PleOffloadError, plan_host_placement

TABLE = "model.ple.table.weight"


class PleTable(nn.Module):
    """A per-layer-embedding table: the rows a batch needs are gathered where the table is, then moved."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.table = nn.Embedding(vocab_size, hidden_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table(ids.to(self.table.weight.device)).to(ids.device)


def tiny_ple_classes() -> tuple[type, type]:
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    class TinyPleConfig(LlamaConfig):
        model_type = "tunefile_tiny_ple"

    class TinyPleForCausalLM(LlamaForCausalLM):
        config_class = TinyPleConfig
        _no_placement_params = ["ple.table.weight"]

        def __init__(self, config: TinyPleConfig) -> None:
            super().__init__(config)
            self.model.ple = PleTable(config.vocab_size, config.hidden_size)
            self.post_init()

        def forward(self, input_ids: torch.Tensor, **kwargs):  # noqa: ANN003, ANN201
            embeds = self.model.embed_tokens(input_ids) + self.model.ple(input_ids)
            return super().forward(inputs_embeds=embeds, **kwargs)

    AutoConfig.register(TinyPleConfig.model_type, TinyPleConfig, exist_ok=True)
    AutoModelForCausalLM.register(TinyPleConfig, TinyPleForCausalLM, exist_ok=True)
    return TinyPleConfig, TinyPleForCausalLM


CONFIG, MODEL = tiny_ple_classes()


@pytest.fixture(scope="module")
def ple_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import shutil

    from transformers import AutoConfig

    directory = tmp_path_factory.mktemp("tiny-ple")
    config = CONFIG(**AutoConfig.from_pretrained(tiny_model_dir).to_diff_dict())
    torch.manual_seed(0)
    MODEL(config).save_pretrained(directory)
    for tokenizer_file in tiny_model_dir.glob("tokenizer*"):
        shutil.copy(tokenizer_file, directory)
    return directory


def placement_for(model_dir: Path, *, quantized: bool = True) -> HostPlacement:
    """What load_base_model plans for a QLoRA base in ``model_dir`` loading onto the (meta) GPU."""
    plan = model_plan(model_dir, adapter="qlora", load_in_4bit=True, precision="bf16", ple_cpu_offload=True)
    return plan_host_placement(plan, source=str(model_dir), quantized=quantized, device="meta")


def load_with(model_dir: Path, device_map: dict) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, device_map=device_map, dtype=torch.float32)


def test_the_table_loads_into_host_memory_and_the_rest_onto_the_gpu(ple_model_dir: Path) -> None:
    placement = placement_for(ple_model_dir)
    assert placement.reason is None and placement.names == [TABLE]
    assert TABLE not in placement.device_map and "" not in placement.device_map
    module = load_with(ple_model_dir, placement.device_map)
    devices = {name: p.device.type for name, p in module.named_parameters()}
    assert devices.pop(TABLE) == "cpu"
    assert set(devices.values()) == {"meta"} and len(devices) == 21
    assert placement.keep(module) == {"ple_cpu_offload": {"in_host_memory": [TABLE], "gib": 0.0}}
    assert module.hf_device_map == {"": "meta"}


def test_the_load_map_is_exact_whatever_the_names_share(tiny_model_dir: Path) -> None:
    """Keys are prefixes as transformers matches them (layers.1 also starts layers.10): checked name by name."""
    from transformers.integrations.accelerate import expand_device_map

    wide = nn.Module()
    wide.layers = nn.ModuleList(nn.Linear(2, 2) for _ in range(12))
    wide.layers[1].register_buffer("scale", torch.ones(1))
    wide._no_placement_params = ["layers.1.weight", "layers.10.bias"]
    placement = HostPlacement.plan(wide, 0)
    placed = expand_device_map(placement.device_map, [n for n, _ in wide.named_parameters()] + ["layers.1.scale"])
    assert {name for name, device in placed.items() if device == "cpu"} == {"layers.1.weight", "layers.10.bias"}
    assert placed["layers.1.scale"] == placed["layers.10.weight"] == placed["layers.11.weight"] == 0


def test_accelerate_leaves_a_4bit_model_with_a_kept_table_where_it_is(ple_model_dir: Path) -> None:
    """accelerate 1.15's prepare moves a model to its device unless it is a 4/8-bit model with a one-device
    hf_device_map: what keep() sets (its device patched to meta, so a move shows without a GPU)."""
    from unittest.mock import patch

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    def prepared_devices(*, loaded_in_4bit: bool) -> set[str]:
        module = load_with(ple_model_dir, {"": "cpu"})
        HostPlacement(0, ["ple.table.weight"], [TABLE], {}, None).keep(module)
        module.is_loaded_in_4bit = loaded_in_4bit  # transformers sets it on a bitsandbytes 4-bit load
        AcceleratorState._reset_state(True)
        try:
            with patch.object(Accelerator, "device", torch.device("meta")):
                prepared = Accelerator(cpu=True).prepare_model(module)
        finally:
            AcceleratorState._reset_state(True)
        return {p.device.type for p in prepared.parameters()}

    assert prepared_devices(loaded_in_4bit=True) == {"cpu"}
    assert prepared_devices(loaded_in_4bit=False) == {"meta"}  # the control: it is the marker that keeps it


def test_a_model_that_declares_nothing_trains_as_planned_and_says_so(tiny_model_dir: Path) -> None:
    placement = placement_for(tiny_model_dir)
    assert placement.device_map == {"": "meta"} and placement.names == []
    reason = "LlamaForCausalLM declares no _no_placement_params (no parameters it keeps off the GPU): nothing to " \
             "keep in host memory"
    assert placement.reason == reason
    module = load_with(tiny_model_dir, {"": "cpu"})
    assert placement.keep(module) == {"ple_cpu_offload": reason}
    assert not hasattr(module, "hf_device_map")


def test_a_16bit_base_is_refused(ple_model_dir: Path) -> None:
    with pytest.raises(PleOffloadError, match="4/8-bit base"):
        placement_for(ple_model_dir, quantized=False)


def test_kbit_preparation_leaves_the_table_in_its_dtype(ple_model_dir: Path) -> None:
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    def prepared(keep: bool) -> nn.Module:
        module = AutoModelForCausalLM.from_pretrained(ple_model_dir, dtype=torch.bfloat16)
        table = module.model.ple.table.weight
        before = table.data_ptr()
        with ple_offload.host_parameters_keep_their_dtype(module, keep):
            module = prepare_model_for_kbit_training(module, use_gradient_checkpointing=False)
        assert (table.data_ptr() == before) == keep
        return module

    module = prepared(True)
    assert module.model.ple.table.weight.dtype == torch.bfloat16
    assert {p.dtype for n, p in module.named_parameters() if n != TABLE} == {torch.float32}
    assert prepared(False).model.ple.table.weight.dtype == torch.float32  # peft's cast, which the block prevents


def test_ddp_ignores_the_table_under_a_lora_adapter(ple_model_dir: Path, tmp_path: Path) -> None:
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model

    module = get_peft_model(load_with(ple_model_dir, {"": "cpu"}),
                            LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    assert ple_offload.ignore_in_ddp(module) == [f"base_model.model.{TABLE}"]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(module)
        assert ddp.parameters_to_ignore == {f"base_model.model.{TABLE}"}
        assert all(p is not module.base_model.model.model.ple.table.weight for p in ddp._module_parameters)
    finally:
        dist.destroy_process_group()
