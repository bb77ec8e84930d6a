"""A tiny randomly initialised causal LM with a real, locally trained tokenizer, saved like a hub checkpoint.

Tests, `make demo` and offline cluster smoke tests use it so that nothing is ever downloaded. The tokenizer is
a byte-level BPE (any text round-trips) trained on a built-in corpus that covers the example data, so the
examples tokenise into few tokens and the model can learn them in a few dozen steps.
"""

from __future__ import annotations

import json
from pathlib import Path

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# Llama 3's header tokens too, so the `llama3` named chat template tokenises compactly.
HEADER_START, HEADER_END, EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, IM_START, IM_END, HEADER_START, HEADER_END, EOT]
VOCAB_SIZE = 1024

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

ARCHITECTURES = ("llama", "mistral", "qwen2", "llama4")

# Generic English plus every word of examples/data (arithmetic, colours, the pangram corpus), the Alpaca prompt
# and chat roles. Repetition gives the BPE trainer counts to merge on; the order is fixed, so training is too.
_ENGLISH = """\
The model reads a prompt and writes a response. A good answer is short, clear and correct.
Below is an instruction that describes a task, paired with an input that provides further context.
Write a response that appropriately completes the request.
Below is an instruction that describes a task. Write a response that appropriately completes the request.
### Instruction:
### Input:
### Response:
system user assistant tool function message content role name
system
user
assistant
Be brief. Be kind. Be clear.
You are a helpful assistant. Answer the question. Explain your reasoning step by step.
What is the capital of France? Paris is the capital of France. Thank you! You are welcome.
Hello, how are you today? I am fine, thanks. Please tell me a story about a cat and a dog.
Once upon a time there was a small village near the sea. The people were kind and worked hard.
Add the two numbers. Subtract the two numbers. Multiply the two numbers. Divide the two numbers.
You repeat colours in capitals. Say red. Say green. Say blue. Say black. Say white. Say yellow.
Say orange. Say purple. Say pink. Say brown. Say grey.
RED GREEN BLUE BLACK WHITE YELLOW ORANGE PURPLE PINK BROWN GREY
the quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog.
one two three four five six seven eight nine ten eleven twelve hundred thousand million
Monday Tuesday Wednesday Thursday Friday Saturday Sunday January February March April May June July
August September October November December morning evening night day week month year time
water fire earth air light dark sun moon star tree river mountain city house school book word
data train training loss learning rate batch sequence token tokens text number numbers sum answer
is are was were be been have has had do does did will would can could should may might must
the a an of to in on at by for with from about into over after before under between through
and or but if then else because so not no yes all some many more most other such only own same
I you he she it we they me him her us them my your his its our their this that these those
"""


def _corpus() -> list[str]:
    lines = _ENGLISH.splitlines()
    numbers = [" ".join(str(n) for n in range(start, start + 10)) for start in range(-100, 200, 10)]
    sums = [f"{a} + {b} = {a + b}. {a} - {b} = {a - b}." for a in range(0, 60, 3) for b in range(0, 60, 7)]
    return lines * 8 + numbers * 4 + sums


def train_tokenizer():
    """A byte-level BPE tokenizer (``tokenizers.Tokenizer``) with bos prepended by its post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    # Offsets are left untrimmed (no ByteLevel post-processor) so token spans tile the text exactly; the
    # chat_template format maps character spans to tokens through them.
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    return tokenizer


def build_tokenizer():
    """The tiny tokenizer wrapped for transformers (``PreTrainedTokenizerFast``) with a ChatML template."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(), bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END, HEADER_START, HEADER_END, EOT],
        model_max_length=2048, clean_up_tokenization_spaces=False)
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def model_config(arch: str, *, vocab_size: int, bos_token_id: int, eos_token_id: int, pad_token_id: int):
    from transformers import Llama4TextConfig, LlamaConfig, MistralConfig, Qwen2Config

    shape = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                 tie_word_embeddings=False, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                 pad_token_id=pad_token_id)
    if arch == "llama":
        return LlamaConfig(**shape)
    if arch == "mistral":
        return MistralConfig(**shape, sliding_window=None)
    if arch == "qwen2":
        return Qwen2Config(**shape, use_sliding_window=False)
    if arch == "llama4":
        # Llama 4's text MoE (Llama4ForCausalLM): every layer routes each token to one of 4 experts (as Scout
        # does) beside a shared expert; the experts are small so that the model stays about as big as the others.
        # Chunked attention with chunks longer than any test's context: the same as full causal attention, and
        # every transformers version accepts it (some build chunked layers by default and need a chunk size).
        return Llama4TextConfig(**{**shape, "intermediate_size": 32}, intermediate_size_mlp=128, head_dim=16,
                                num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=1,
                                attention_chunk_size=8192)
    raise ValueError(f"unknown tiny-model architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")


def build_tiny_model(directory: str | Path, arch: str = "llama", seed: int = 0) -> Path:
    """Write a tiny ``arch`` model (random weights from ``seed``) and its tokenizer into ``directory``.

    The directory then loads with ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``
    exactly like a downloaded checkpoint. The same (arch, seed) gives the same weights and tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown tiny-model architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    trained = build_tokenizer()
    trained.save_pretrained(directory)
    # Reload as every consumer will, beside the model's config: some architectures' tokenizer classes rebuild
    # the pipeline (qwen2 splits digits and adds <|endoftext|>), so the files on disk and the vocabulary size
    # come from what loads.
    model_config(arch, vocab_size=len(trained), bos_token_id=trained.bos_token_id,
                 eos_token_id=trained.eos_token_id, pad_token_id=trained.pad_token_id).save_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.save_pretrained(directory)
    config = model_config(arch, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    # Seed a private generator's worth of state: fork_rng leaves the caller's global RNG untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Generation stops at the end of text and at the end of a chat turn.
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END),
                      tokenizer.convert_tokens_to_ids(EOT)])
    model.save_pretrained(directory)
    (directory / "README.md").write_text(
        f"# tiny {arch} model\n\nRandomly initialised (seed {seed}) by `python -m tunefile.runtime tiny-model`; "
        f"{sum(p.numel() for p in model.parameters()):,} parameters, vocabulary {len(tokenizer)}.\n"
        "For tests and demos only: it knows nothing until trained.\n", encoding="utf-8")
    _record(directory, arch=arch, seed=seed)
    return directory


def _record(directory: Path, *, arch: str, seed: int) -> None:
    (directory / "tiny_model.json").write_text(json.dumps({"arch": arch, "seed": seed}, sort_keys=True) + "\n",
                                               encoding="utf-8")
