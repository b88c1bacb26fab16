"""Token streaming on PyTorch, for `mlxft generate`, `mlxft chat` and `mlxft serve --backend torch`:
the same TextGenerator as mlxft.backends.mlx.stream (encode, stream, context_length, name,
tokenizer), so the commands and the server take either.

    mlxft chat --backend torch --adapter runs/alpaca-20261121

A decode loop of its own over transformers' KV cache, rather than model.generate with a streamer
on a second thread: a token is handed out the moment it is sampled, on the caller's thread (the
server cancels between tokens by no longer asking), and sampling follows mlx-lm's make_sampler and
repetition penalty exactly, so both backends draw from the same distribution. The answer's text,
finish reason and counts come from mlxft.generation.answer_pieces, shared by every backend.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from pathlib import Path

import torch

from mlxft.backends.torch.sampling import next_token
from mlxft.generation import Generator, Piece, Sampling, answer_pieces, end_of_sequence_ids

# mlx-lm's make_logits_processors default: the repetition penalty looks at the last 20 tokens
# (prompt included).


class TextGenerator(Generator):
    def __init__(self, model, tokenizer, folder: Path, name: str):
        super().__init__(model, tokenizer, folder, name)
        self.end_ids = end_of_sequence_ids(folder, tokenizer)

    def batch_engine(self):
        """The running batch `mlxft serve` answers many requests with (mlxft.backends.torch.serve_batch),
        or None when this model's cache cannot be batched."""
        from mlxft.backends.torch.serve_batch import batch_engine

        return batch_engine(self.model, self.tokenizer, self.end_ids)

    def stream(self, prompt_ids: list[int], sampling: Sampling) -> Iterator[Piece]:
        """Answer pieces as tokens come; not thread-safe (the server runs it on one thread of its own)."""
        tokens = sampled_tokens(self.model, prompt_ids, sampling)
        try:
            yield from answer_pieces(tokens, self.tokenizer, self.end_ids, sampling, len(prompt_ids))
        finally:
            tokens.close()


@torch.inference_mode()
def sampled_tokens(model, prompt_ids: list[int], sampling: Sampling) -> Iterator[int]:
    """Token ids, one forward pass each over the KV cache, for as long as the caller asks (at most
    max_tokens); the next forward runs only when the next token is asked for."""
    from mlxft.backends.torch.model import autocast

    device = next(model.parameters()).device
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    history = list(prompt_ids)
    accepted = inspect.signature(model.forward).parameters
    # Only the last position's logits: the prompt's others would cost [prompt length x vocabulary].
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in accepted else {}
    with autocast(device):
        output = model(input_ids=torch.tensor([prompt_ids], device=device), use_cache=True, **last_only)
    # transformers 5.24 renamed past_key_values to cache (the old name warns); older versions know only the old one.
    cache = {"cache" if "cache" in accepted else "past_key_values": output.get("cache", output.get("past_key_values"))}
    for step in range(sampling.max_tokens):
        token = next_token(output.logits[0, -1].float(), history, sampling, generator)
        yield token
        history.append(token)
        if step + 1 < sampling.max_tokens:
            with autocast(device):
                output = model(input_ids=torch.tensor([[token]], device=device), use_cache=True, **cache)


def load_generator(model_name: str | None, adapter: str | Path | None = None, *, trust_remote_code: bool = False) -> TextGenerator:
    """A base model (+ adapter, applied unfused through PEFT) ready to answer. Without --model the
    adapter's own base model (adapter_config.json) is used, else the built-in model."""
    from mlxft.backends.torch import lora
    from mlxft.backends.torch.model import load
    from mlxft.generation import adapter_and_base
    from mlxft.models.adapters import apply_adapter

    spec, weights, model_name = adapter_and_base(adapter, model_name)
    model, tokenizer, folder = load(model_name, trust_remote_code=trust_remote_code)
    if spec is not None:
        apply_adapter(lora, model, spec, weights, str(adapter))
    model.eval()  # LoRA dropout off
    return TextGenerator(model, tokenizer, folder, model_name)

