"""Token streaming on MLX through mlx-lm (stream_generate, make_sampler, make_logits_processors),
for `mlxft generate`, `mlxft chat` and `mlxft serve`.

A model is a base plus an optional adapter applied on the fly (no fusing needed), or a fused
folder. Prompt ids are encoded as in training (mlxft.data.encode.encode_prompt: BOS once), so a
tuned model sees at answer time exactly the prompt it learned from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import mlx.core as mx

from mlxft.generation import Generator, Piece, Sampling, StopScanner, adapter_and_base


class TextGenerator(Generator):

    def batch_engine(self):
        """The running batch `mlxft serve` answers many requests with (mlxft.backends.mlx.serve_batch),
        or None when this model cannot be batched or already carries an adapter of its own (named
        adapters are added to the engine instead, per row)."""
        from mlxft.backends.mlx.lora import lora_layers
        from mlxft.backends.mlx.serve_batch import batch_engine

        if lora_layers(self.model):
            return None
        return batch_engine(self.model, self.tokenizer)

    def stream(self, prompt_ids: list[int], sampling: Sampling) -> Iterator[Piece]:
        """Answer pieces as tokens come; not thread-safe (the server runs it on one thread of its own)."""
        from mlx_lm.generate import stream_generate
        from mlx_lm.sample_utils import make_logits_processors, make_sampler

        if sampling.seed is not None:
            mx.random.seed(sampling.seed)
        # top_k past the vocabulary keeps every token, which is what top_k 0 means.
        vocabulary = self.model.args.vocab_size if hasattr(self.model, "args") else None
        top_k = 0 if vocabulary is not None and sampling.top_k >= vocabulary else sampling.top_k
        sampler = make_sampler(temp=sampling.temperature, top_p=sampling.top_p, top_k=top_k)
        penalty = sampling.repetition_penalty if sampling.repetition_penalty != 1.0 else None
        processors = make_logits_processors(repetition_penalty=penalty)
        stops = StopScanner(sampling.stop)
        n_prompt = len(prompt_ids)
        for response in stream_generate(self.model, self.tokenizer, mx.array(prompt_ids), max_tokens=sampling.max_tokens,
                                        sampler=sampler, logits_processors=processors):
            text = stops.feed(response.text)
            if stops.stopped:
                yield Piece(text, "stop", n_prompt, response.generation_tokens)
                return
            if response.finish_reason:
                # The end-of-sequence token ends the answer; it is not part of it.
                used = response.generation_tokens - (response.finish_reason == "stop")
                yield Piece(text + stops.finish(), response.finish_reason, n_prompt, used)
                return
            if text:
                yield Piece(text, None, n_prompt, response.generation_tokens)


def load_generator(model_name: str | None, adapter: str | Path | None = None, *, trust_remote_code: bool = False) -> TextGenerator:
    """A base model (+ adapter, applied unfused) ready to answer. Without --model the adapter's
    own base model (adapter_config.json) is used, else the built-in model."""
    from mlxft.backends.mlx import lora
    from mlxft.backends.mlx.model import load
    from mlxft.models.adapters import apply_adapter

    spec, weights, model_name = adapter_and_base(adapter, model_name)
    model, tokenizer, folder = load(model_name, trust_remote_code=trust_remote_code)
    if spec is not None:
        apply_adapter(lora, model, spec, weights, str(adapter))
    model.eval()  # new LoRA layers start in training mode, where their dropout would be live
    return TextGenerator(model, tokenizer, folder, model_name)
