"""`inference CONFIG --gradio [--host H] [--port N]`: a chat page in the browser, served by Gradio (the `ui`
extra) on this machine only unless --host says otherwise. Replies stream in as they are generated; for chat
template runs the page sends the whole conversation, formatted as in training, and for alpaca or completion
runs only the latest message (those formats were trained on single prompts).

Replies are shown as plain text, not Markdown: this page is for checking what a fine-tune learnt, and a
rendered reply would hide the exact characters the model produced.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from typing import Any

from .model import ModelLoadError
from .prompts import Message
from .reply import ReplyStreamer


def require_gradio() -> None:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ModelLoadError("--gradio needs Gradio: pip install 'tunefile[ui]'") from None


def as_messages(history: list[Any]) -> list[Message]:
    """Gradio's history ({"role", "content"} with text or a list of content parts) as plain text messages."""
    messages = []
    for item in history:
        content = item.get("content")
        if isinstance(content, list):
            content = "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
        messages.append({"role": str(item.get("role")), "content": "" if content is None else str(content)})
    return messages


def build_page(chat: ReplyStreamer, *, title: str) -> Any:
    # Gradio phones home for analytics unless told not to before it is imported; this machine may be offline.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    def respond(message: str, history: list[Any]) -> Iterator[str]:
        past = as_messages(history) if chat.prompts.keeps_history else []
        reply = ""
        for piece in chat.stream(message, past):
            reply += piece
            yield reply
        if not reply.strip():
            yield "(the model ended its reply without text)"

    sampling = chat.sampling
    description = (f"Prompts are formatted as {chat.prompts.kind} training data. Temperature {sampling.temperature:g}"
                   f"{' (greedy)' if sampling.temperature <= 0 else f', top-p {sampling.top_p:g}'}, "
                   f"at most {sampling.max_new_tokens} new tokens.")
    return gr.ChatInterface(
        respond, title=title, description=description, analytics_enabled=False, flagging_mode="never",
        chatbot=gr.Chatbot(render_markdown=False, height=480, elem_id="chat"),
        textbox=gr.Textbox(placeholder="Type a message and press Enter", elem_id="message", submit_btn=True,
                           stop_btn=True, show_label=False, scale=7),
    )


def serve(chat: ReplyStreamer, *, host: str, port: int, title: str) -> None:
    """Blocks until Ctrl-C."""
    page = build_page(chat, title=title)
    print(f"tunefile inference: chat page on http://{host}:{port}/ (Ctrl-C stops it)", file=sys.stderr, flush=True)
    # One generation at a time: the model is shared, and a second request waits in Gradio's queue.
    page.queue(default_concurrency_limit=1).launch(server_name=host, server_port=port, share=False,
                                                   ssr_mode=False, quiet=True, show_error=True)
