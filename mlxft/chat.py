"""`mlxft generate` and `mlxft chat`: answers streamed to the terminal as the tokens come.

    mlxft chat --model models/alpaca-fused --template alpaca
    mlxft generate --adapter runs/alpaca-20261121 --prompt "Name three colours."

In the chat, /reset forgets the conversation, /input TEXT attaches an Alpaca input to the next
message, /quit (or Ctrl-D) leaves; Ctrl-C stops an answer. Works with any streamer that has
encode(), stream() and context_length (mlxft.backends.mlx.stream.TextGenerator).
"""

from __future__ import annotations

from dataclasses import replace

from mlxft.conversation import Conversation
from mlxft.generation import ContextTooLong, Sampling, fit_to_context

HELP = "commands: /reset forget the conversation, /input TEXT attach an input to the next message, /quit leave"


def stream_answer(generator, prompt: str, sampling: Sampling, write) -> str:
    """Write the answer as it comes and return it whole; ContextTooLong when the prompt fills the context."""
    ids = generator.encode(prompt)
    sampling = replace(sampling, max_tokens=fit_to_context(len(ids), sampling.max_tokens, generator.context_length))
    parts = []
    for piece in generator.stream(ids, sampling):
        write(piece.text)
        parts.append(piece.text)
    return "".join(parts)


def run_chat(generator, conversation: Conversation, sampling: Sampling, *, read, write) -> None:
    """The read-answer loop. read(prompt) returns a line (EOFError at the end); write(text) shows text."""
    pending_input = ""
    write(f"chatting with {generator.name} ({conversation.template} template); {HELP}\n")
    while True:
        try:
            line = read(">>> ")
        except (EOFError, KeyboardInterrupt):
            write("\n")
            return
        text = line.strip()
        if not text:
            continue
        command = text.split(maxsplit=1)[0] if text.startswith("/") else None
        if command in ("/quit", "/exit"):
            return
        if command == "/reset":
            conversation.reset()
            pending_input = ""
            write("(conversation cleared)\n")
            continue
        if command == "/input":
            pending_input = text[len("/input"):].strip()
            write("(input attached to the next message)\n" if pending_input else "(input cleared)\n")
            continue
        if command is not None:
            write(f"{HELP}\n")
            continue
        try:
            answer = stream_answer(generator, conversation.prompt(text, pending_input), sampling, write)
        except ContextTooLong as e:
            write(f"({e}; /reset to start over)\n")
            continue
        except KeyboardInterrupt:
            write("\n(answer stopped; not kept in the conversation)\n")
            continue
        write("\n")
        conversation.record(text, answer, pending_input)
        pending_input = ""
        # A seed makes the session reproducible; re-seeding each answer would repeat the same draws.
        sampling = replace(sampling, seed=None)
