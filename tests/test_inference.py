"""`tunefile inference`: prompts are the token sequences training built, replies stream and are greedy
(deterministic) at temperature 0, and the CLI answers --prompt and stdin with or without the adapter."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from test_merge_lora import compiled_config, make_adapter

from runtime_bundles import run_tunefile as tunefile
from tunefile.compiler.render.config_yaml import dataset_plan
from tunefile.compiler.spec import DatasetSpec
from tunefile.runtime.config import load_run_plan
from tunefile.runtime.data.chat import ChatTemplateFormat
from tunefile.runtime.data.formats import IGNORE, AlpacaFormat
from tunefile.runtime.inference import run_inference
from tunefile.runtime.model import ModelLoadError
from tunefile.runtime.prompts import PromptBuilder, PromptError
from tunefile.runtime.reply import ReplyStreamer, Sampling
from tunefile.schemas.run_plan import DataPlan

CONVERSATION = [{"role": "system", "content": "You repeat colours in capitals."},
                {"role": "user", "content": "Say red."}, {"role": "assistant", "content": "RED"}]


def data_plan(dataset: dict[str, Any], **changes: Any) -> DataPlan:
    """The run plan's data section for one dataset, its entry's defaults written out by the compiler's own code."""
    values: dict[str, Any] = {
        "datasets": (dataset_plan(DatasetSpec.model_validate(dataset)),), "sequence_len": 128, "micro_batch_size": 1,
        "packing_attention": None, "pad_to_sequence_len": False, "train_on_inputs": False, "val_set_size": 0.0,
        "prepared_path": "prepared", "chat_template": None, "chat_template_jinja": None, "chat_template_kwargs": {},
        "eot_tokens": None,
        "eval_packing": False, "skip_prepare": False, "streaming": False, "exact_deduplication": False,
        "group_by_length": False, "min_sample_len": 2}
    return DataPlan(**{**values, **changes})


def prompt_part(example: Any) -> list[int]:
    """The tokens before the first trained one: what the model was given to continue."""
    first_trained = next(i for i, label in enumerate(example.labels) if label != IGNORE)
    return example.input_ids[:first_trained]


@pytest.mark.parametrize("row", [{"instruction": "Add the two numbers.", "input": "25 + 49", "output": "74"},
                                 {"instruction": "Say red.", "output": "RED"}])
def test_alpaca_prompt_is_the_training_prompt(tiny_tokenizer: Any, row: dict[str, str]) -> None:
    import json

    builder = PromptBuilder(data_plan({"path": "a.jsonl", "type": "alpaca"}), tiny_tokenizer)
    trained = prompt_part(AlpacaFormat(tiny_tokenizer, train_on_inputs=False)(row)[0])
    assert builder.token_ids(json.dumps(row)) == trained  # a line of the training file
    if "input" not in row:
        assert builder.token_ids(row["instruction"]) == trained  # plain text is the instruction
    assert trained[0] == tiny_tokenizer.bos_token_id


@pytest.mark.parametrize("template, end_of_turn", [(None, "<|im_end|>"), ("llama3", "<|eot_id|>")])
def test_chat_prompt_is_the_training_rendering(tiny_tokenizer: Any, template: str | None, end_of_turn: str) -> None:
    import json

    data = data_plan({"path": "c.jsonl", "type": "chat_template"}, chat_template=template)
    builder = PromptBuilder(data, tiny_tokenizer)
    trained = prompt_part(ChatTemplateFormat(data.datasets[0], data, tiny_tokenizer)({"messages": CONVERSATION})[0])
    assert builder.token_ids(json.dumps({"messages": CONVERSATION})) == trained
    assert builder.token_ids("Say red.", history=CONVERSATION[:1]) == trained
    assert tiny_tokenizer.convert_tokens_to_ids(end_of_turn) in builder.stop_token_ids()
    if template == "llama3":  # the named template training used, not the tokenizer's own ChatML
        assert tiny_tokenizer.convert_tokens_to_ids("<|start_header_id|>") in trained


def test_completion_prompt_is_raw_text_and_bad_rows_are_reported(tiny_tokenizer: Any) -> None:
    builder = PromptBuilder(data_plan({"path": "t.jsonl", "type": "completion", "field": "text"}), tiny_tokenizer)
    assert builder.token_ids("Once upon a time") == tiny_tokenizer("Once upon a time").input_ids
    assert builder.token_ids('{"text": "Once upon a time"}') == tiny_tokenizer("Once upon a time").input_ids
    alpaca = PromptBuilder(data_plan({"path": "a.jsonl", "type": "alpaca"}), tiny_tokenizer)
    with pytest.raises(PromptError, match="instruction"):
        alpaca.token_ids('{"input": "25 + 49"}')
    pretokenized = PromptBuilder(data_plan({"path": "p.jsonl", "type": "pretokenized"}), tiny_tokenizer)
    assert pretokenized.token_ids("Once upon a time") == tiny_tokenizer("Once upon a time").input_ids
    with pytest.raises(PromptError, match="no datasets"):
        PromptBuilder(data_plan({"path": "t.jsonl", "type": "completion"}, datasets=()), tiny_tokenizer)


def test_streamed_greedy_reply_is_what_generate_returns(tiny_model_dir: Path, tiny_tokenizer: Any) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    builder = PromptBuilder(data_plan({"path": "a.jsonl", "type": "alpaca"}), tiny_tokenizer)
    chat = ReplyStreamer(model, tiny_tokenizer, builder, Sampling(max_new_tokens=16, temperature=0))
    pieces = list(chat.stream("Tell me a story about a cat."))
    assert len(pieces) > 1  # streamed, not handed over at the end

    ids = torch.tensor([builder.token_ids("Tell me a story about a cat.")])
    generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False,
                               eos_token_id=chat.stop_ids, pad_token_id=chat.pad_id)
    expected = tiny_tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True)
    assert "".join(pieces) == expected and expected.strip()
    assert chat.reply("Tell me a story about a cat.") == expected  # greedy: the same every time

    sampled = ReplyStreamer(model, tiny_tokenizer, builder, Sampling(max_new_tokens=4, temperature=1.0, top_p=0.9))
    assert isinstance(sampled.reply("Say red."), str)


def greedy_reply(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int) -> str:
    """The reference: the training formatter's prompt, plain generate, plain decode (none of inference.py)."""
    ids = torch.tensor([prompt_part(AlpacaFormat(tokenizer, train_on_inputs=False)(
        {"instruction": prompt, "output": "x"})[0])])
    stops = [*model.generation_config.eos_token_id, tokenizer.eos_token_id]
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)



def test_cli_answers_stdin_with_the_adapter_and_a_prompt_without_it(tmp_path: Path, tiny_model_dir: Path,
                                                                     tiny_tokenizer: Any) -> None:
    adapted = make_adapter(tiny_model_dir, tmp_path / "out")
    compiled_config(tmp_path, tiny_model_dir, adapter="lora")
    prompts = ["Add the two numbers.", "Tell me a story about a cat."]
    expected = [greedy_reply(adapted, tiny_tokenizer, prompt, 12) for prompt in prompts]
    with adapted.disable_adapter():
        expected_base = greedy_reply(adapted, tiny_tokenizer, prompts[0], 12)
    assert expected[0] != expected_base  # the adapter changes the reply, so the two runs below are told apart

    piped = tunefile("inference", "cfg.yml", "--max-new-tokens", "12", cwd=tmp_path, stdin="\n".join(prompts) + "\n")
    assert piped.returncode == 0, piped.stderr[-3000:]
    assert piped.stdout.split("\n") == [*expected, ""]  # one reply per line; logs stay on stderr
    assert "adapter out" in piped.stderr

    base = tunefile("inference", "cfg.yml", "--base-only", "--prompt", prompts[0], "--max-new-tokens", "12",
                    cwd=tmp_path)
    assert base.returncode == 0, base.stderr[-3000:]
    assert base.stdout == expected_base + "\n"


def test_missing_model_is_a_user_error(tmp_path: Path, tiny_model_dir: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Raised as a RuntimeUserError (ModelLoadError), which the entry point prints as one line, exit 2."""
    monkeypatch.chdir(tmp_path)
    full = compiled_config(tmp_path, tiny_model_dir)  # full fine-tune, not trained yet
    with pytest.raises(ModelLoadError, match="no trained model yet"):
        run_inference(full, prompt="hi")
    lora = compiled_config(tmp_path, tiny_model_dir, adapter="lora")
    with pytest.raises(ModelLoadError, match="nowhere: no such directory"):
        run_inference(lora, prompt="hi", lora_dir="nowhere")
    assert load_run_plan(lora).model.adapter == "lora"


def test_cli_reports_a_missing_model_in_one_line_with_exit_2(tmp_path: Path, tiny_model_dir: Path) -> None:
    compiled_config(tmp_path, tiny_model_dir)  # full fine-tune, not trained yet
    result = tunefile("inference", "cfg.yml", "--prompt", "hi", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    message = [line for line in result.stderr.splitlines() if "no trained model yet" in line]
    assert len(message) == 1 and message[0].startswith("tunefile runtime: "), result.stderr[-3000:]
