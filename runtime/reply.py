"""Replies from the trained model, streamed as text pieces while it generates them: what the terminal
(inference.py) and the browser page (chat_ui.py) both show. Prompts are built by prompts.py, as training
built its examples."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .prompts import Message, PromptBuilder


@dataclass(frozen=True)
class Sampling:
    """How replies are drawn; the command line's --max-new-tokens, --temperature and --top-p."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy, the same reply every time
    top_p: float = 1.0

    def generate_kwargs(self) -> dict[str, Any]:
        # None switches off what the model's generation_config sets (Llama 3 ships temperature 0.6, top_p 0.9,
        # sampling on), so these flags alone decide how replies are drawn.
        if self.temperature <= 0:
            return {"max_new_tokens": self.max_new_tokens, "do_sample": False, "temperature": None, "top_p": None,
                    "top_k": None}
        return {"max_new_tokens": self.max_new_tokens, "do_sample": True, "temperature": self.temperature,
                "top_p": self.top_p, "top_k": None}


def stop_token_ids(model: Any, prompts: PromptBuilder) -> list[int]:
    """The model's own end-of-sequence ids (generation_config), then those the prompt format ends turns with."""
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is None:
        configured = []
    elif not isinstance(configured, list):
        configured = [configured]
    return list(dict.fromkeys([*configured, *prompts.stop_token_ids()]))


class ReplyStreamer:
    """Replies to messages, yielded as text pieces while the model generates them."""

    def __init__(self, model: Any, tokenizer: Any, prompts: PromptBuilder, sampling: Sampling) -> None:
        self.model, self.tokenizer, self.prompts, self.sampling = model, tokenizer, prompts, sampling
        self.stop_ids = stop_token_ids(model, prompts)
        # generate() needs a pad id even for one sequence; with none in the tokenizer, a stop id serves.
        pad = tokenizer.pad_token_id
        if pad is not None:
            self.pad_id = pad
        else:
            self.pad_id = self.stop_ids[0] if self.stop_ids else 0

    def stream(self, message: str, history: Sequence[Message] = ()) -> Iterator[str]:
        from transformers import TextIteratorStreamer

        input_ids = torch.tensor([self.prompts.token_ids(message, history)], device=self.model.device)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        failure: list[BaseException] = []

        def generate() -> None:
            try:
                with torch.inference_mode():
                    self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                        streamer=streamer, eos_token_id=self.stop_ids if self.stop_ids else None,
                                        pad_token_id=self.pad_id, **self.sampling.generate_kwargs())
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread below
                failure.append(exc)
                streamer.end()  # unblock the reader

        # generate() runs in a thread and feeds the streamer; this thread reads pieces as they are decoded.
        worker = threading.Thread(target=generate, daemon=True)
        worker.start()
        yield from streamer
        worker.join()
        if failure:
            raise failure[0]

    def reply(self, message: str, history: Sequence[Message] = ()) -> str:
        return "".join(self.stream(message, history))
