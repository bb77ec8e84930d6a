"""Instruction formats: one prompt around an instruction (and an optional input), then the response to learn.

These are Axolotl's types that build a prompt with its ``AlpacaPrompter`` (src/axolotl/prompters.py) and
tokenise it with an ``InstructionPromptTokenizingStrategy`` (src/axolotl/prompt_tokenizers.py):

- ``alpaca``: the instruct style (``### Instruction:`` / ``### Input:`` / ``### Response:``);
- ``alpaca:chat``: the same system sentence in the chat style (``SYSTEM:`` / ``USER:`` / ``ASSISTANT:``). Axolotl
  splits the type at ":" into a base type and a prompt style (utils/data/sft.py ``_parse_dataset_type``); no
  strategy module is called ``alpaca:chat``, so the alpaca handler builds ``AlpacaPrompter("chat")``;
- ``alpaca:phi``: the same, in Phi-3's ``<|system|>`` / ``<|user|>`` / ``<|assistant|>`` style;
- ``jeopardy``: the instruct style over a Jeopardy row: the question is the instruction, the category the input
  and the response is "what is " followed by the answer. (Axolotl's ``JeopardyPrompter`` declares a Jeopardy
  wording, but nothing reads that attribute: the prompt built is alpaca's, and that is what we reproduce.)

Every style picks its "with input" template when the input is non-blank and its "no input" template otherwise
(whose system sentence does not mention an input). The prompt is tokenised with the tokenizer's special tokens
(bos), the response without them and followed by eos; the prompt's labels are -100 unless ``train_on_inputs``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .examples import IGNORE, Encoded, Example, Format, text_field

# Axolotl's AlpacaPrompter system sentences, written into every style's templates below.
SYSTEM_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.")
SYSTEM_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.")


@dataclass(frozen=True)
class InstructionStyle:
    """How one type words its prompt and which row keys it reads."""

    with_input: str  # template over {instruction} and {input}; the response follows it directly
    without_input: str  # template over {instruction}
    instruction_key: str = "instruction"
    input_key: str = "input"
    output_key: str = "output"
    input_required: bool = False  # a row without the input key is malformed (Axolotl indexes it directly)
    response_prefix: str = ""  # written before the row's output, as part of the trained response

    def render(self, instruction: str, extra: str) -> str:
        """The prompt text for an instruction and an input ("" for none)."""
        if extra.strip():
            return self.with_input.format(instruction=instruction, input=extra)
        return self.without_input.format(instruction=instruction)


INSTRUCT = InstructionStyle(
    with_input=SYSTEM_WITH_INPUT + "\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
    without_input=SYSTEM_NO_INPUT + "\n\n### Instruction:\n{instruction}\n\n### Response:\n",
)

STYLES: dict[str, InstructionStyle] = {
    "alpaca": INSTRUCT,
    "alpaca:chat": InstructionStyle(
        with_input="SYSTEM: " + SYSTEM_WITH_INPUT + "\nUSER: {instruction}\n{input}\nASSISTANT:",
        without_input="SYSTEM: " + SYSTEM_NO_INPUT + "\nUSER: {instruction}\nASSISTANT:",
    ),
    # Phi's input template has no newline around the input and none after <|assistant|>; its no-input template
    # has both. Both as Axolotl writes them.
    "alpaca:phi": InstructionStyle(
        with_input="<|system|>\n" + SYSTEM_WITH_INPUT + "<|end|>\n<|user|>\n{instruction}<|end|>{input}<|assistant|>",
        without_input="<|system|>\n" + SYSTEM_NO_INPUT + "<|end|>\n<|user|>\n{instruction}<|end|>\n<|assistant|>\n",
    ),
    "jeopardy": InstructionStyle(
        with_input=INSTRUCT.with_input, without_input=INSTRUCT.without_input, instruction_key="question",
        input_key="category", output_key="answer", input_required=True, response_prefix="what is ",
    ),
}


class AlpacaFormat(Format):
    """An instruction style's prompt, then the response and eos; the prompt is masked unless
    ``train_on_inputs``. Prompt and response are tokenised separately so the split is exact and matches
    inference, where the model continues the tokenised prompt."""

    def __init__(self, tokenizer: Any, *, train_on_inputs: bool, style: InstructionStyle = INSTRUCT) -> None:
        super().__init__(tokenizer)
        self.train_on_inputs, self.style = train_on_inputs, style
        self.eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def prompt(self, row: dict[str, Any], *, input_required: bool = False) -> str:
        """The prompt text of a row (its output is not read): what the model continues at inference too."""
        style = self.style
        extra = text_field(row, style.input_key, required=input_required)
        return style.render(text_field(row, style.instruction_key), extra)

    def texts(self, row: dict[str, Any]) -> tuple[list[tuple[str, bool]], Any]:
        prompt = self.prompt(row, input_required=self.style.input_required)
        output = self.style.response_prefix + text_field(row, self.style.output_key)
        return [(prompt, True), (output, False)], None

    def assemble(self, encoded: list[Encoded], context: Any) -> list[Example]:
        prompt, response = list(encoded[0][0]), list(encoded[1][0]) + self.eos
        prompt_labels = list(prompt) if self.train_on_inputs else [IGNORE] * len(prompt)
        return [Example(prompt + response, prompt_labels + response)]
