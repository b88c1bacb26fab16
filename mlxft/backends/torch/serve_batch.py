"""Continuous batching on PyTorch for `mlxft serve --backend torch`: the model's side of
mlxft.serve.scheduler, with the interface of mlxft.backends.mlx.serve_batch.BatchEngine, except that it
computes no step ahead: start() returns the first tokens at once.

The running batch is a list of rows over one transformers DynamicCache whose rows are left-padded
to a common length: `valid [B, T]` says which cached positions of a row are real. New requests
join between decode steps: their prompts run on their own (those of equal length together, so no
prompt is padded) and their keys and values are padded on the left to the batch's length (or the
batch to theirs) and added as rows; a finished or cancelled row is dropped, and columns that are
padding in every row left are cut. A decode step runs every row at once with a padding mask and
each row's own position (its count of real tokens), so a row computes what it would alone.

Each row samples as the one-request path does (mlxft.backends.torch.sampling.next_token, mlx-lm's
rules) with its own torch.Generator, seeded by the request's seed: a seeded answer does not
depend on what else is in the batch. Greedy rows take the argmax of the batch's logits.

Named adapters per row are MLX's (mlxft.backends.mlx.adapter_stack); here the model serves the one
adapter it was loaded with, for every row.

transformers has a continuous-batching manager of its own (generate_batch, paged attention), but
it takes one generation config for all requests (no per-request temperature, top-p or seed) and
hands out results through its own thread; this loop is short enough to own.
"""

from __future__ import annotations

import inspect
import random
from dataclasses import dataclass, field

import torch

from mlxft.backends.torch.sampling import next_token
from mlxft.errors import UserError
from mlxft.generation import RunningBatch, Sampling, TextDecoder, length_groups


class StreamingDecoder:
    """mlx-lm's streaming detokenizer interface (add_token, finalize, last_segment: the text since
    it was last read) over mlxft.generation.TextDecoder, for mlxft.serve.scheduler."""

    def __init__(self, tokenizer):
        self.decoder, self.pending = TextDecoder(tokenizer), ""

    def add_token(self, token: int) -> None:
        self.pending += self.decoder.add(token)

    def finalize(self) -> None:
        self.pending += self.decoder.finish()

    @property
    def last_segment(self) -> str:
        text, self.pending = self.pending, ""
        return text


class NoAdapters:
    """What the scheduler asks of the engine's adapters when there are none by name."""

    names: tuple[str, ...] = ()


@dataclass
class Row:
    sampling: Sampling
    generator: torch.Generator
    history: list[int] = field(default_factory=list)  # prompt and answer so far (repetition penalty; its length is the position)


class BatchEngine(RunningBatch):
    """The running batch of one model; used from one thread only (the server's model thread)."""

    def __init__(self, model, tokenizer, end_ids: set[int]):
        self.model = model
        self.tokenizer = tokenizer
        self.end_ids = set(end_ids)
        self.device = next(model.parameters()).device
        accepted = inspect.signature(model.forward).parameters
        # transformers 5.24 renamed past_key_values to cache (the old name warns); older versions know only the old one.
        self.cache_name = "cache" if "cache" in accepted else "past_key_values"
        self.last_only = {"logits_to_keep": 1} if "logits_to_keep" in accepted else {}
        self.adapters = NoAdapters()
        self.rows: list[Row] = []
        self.cache = None  # a DynamicCache of every row, left-padded; None while no row runs
        self.valid = None  # [B, T] bool: the real positions of each row's cache
        self.last: list[int] = []  # the newest token of each row, the next step's input

    @property
    def eos_ids(self) -> set[int]:
        return self.end_ids

    def detokenizer(self) -> StreamingDecoder:
        return StreamingDecoder(self.tokenizer)

    def slot(self, name: str | None) -> int:
        if name is not None:
            raise KeyError(name)
        return 0

    def add_adapter(self, name: str, spec, weights, where: str, default: bool = False) -> None:
        raise UserError("adapters by name (NAME=PATH, --adapters-dir, POST /v1/adapters) are served on MLX only; "
                        "on PyTorch give one adapter as --adapter PATH")

    def remove_adapter(self, name: str) -> None:
        raise KeyError(name)

    @torch.inference_mode()
    def start(self, requests: list[tuple[list[int], Sampling, int]]) -> list[int]:
        """Run the prompts of new requests ((prompt ids, sampling, adapter slot) each), add them to
        the batch, and return each one's first token."""
        from mlxft.backends.torch.model import autocast

        before = len(self.rows)
        firsts, joined = {}, []
        for group in length_groups([ids for ids, _, _ in requests]):
            rows = [Row(requests[i][1], row_generator(requests[i][1], self.device), list(requests[i][0])) for i in group]
            with autocast(self.device):
                output = self.model(input_ids=torch.tensor([requests[i][0] for i in group], device=self.device),
                                    use_cache=True, **self.last_only)
            tokens = self.sample(output.logits[:, -1].float(), rows)
            self.join(rows, output.get("cache", output.get("past_key_values")), tokens)
            firsts.update(zip(group, tokens))
            joined += group
        self.in_request_order(before, joined)
        return [firsts[i] for i in range(len(requests))]

    def join(self, rows: list[Row], cache, tokens: list[int]) -> None:
        length = cache.layers[0].keys.shape[-2]
        valid = torch.ones((len(rows), length), dtype=torch.bool, device=self.device)
        if self.cache is None:
            self.cache, self.valid = cache, valid
        else:
            width = max(self.valid.shape[1], length)
            for mine, theirs in zip(self.cache.layers, cache.layers):
                mine.keys = torch.cat([pad_left(mine.keys, width), pad_left(theirs.keys, width)])
                mine.values = torch.cat([pad_left(mine.values, width), pad_left(theirs.values, width)])
            self.valid = torch.cat([pad_left(self.valid, width, dim=1), pad_left(valid, width, dim=1)])
        self.rows.extend(rows)
        for row, token in zip(rows, tokens):
            row.history.append(token)
        self.last = self.last + tokens

    @torch.inference_mode()
    def step(self) -> list[int]:
        """One token more for every row, in row order."""
        from mlxft.backends.torch.model import autocast

        self.valid = torch.cat([self.valid, torch.ones((len(self.rows), 1), dtype=torch.bool, device=self.device)], dim=1)
        positions = torch.tensor([[len(row.history) - 1] for row in self.rows], device=self.device)
        with autocast(self.device):
            output = self.model(input_ids=torch.tensor(self.last, device=self.device)[:, None], attention_mask=self.valid.long(),
                                position_ids=positions, use_cache=True, **{self.cache_name: self.cache})
        self.last = self.sample(output.logits[:, -1].float(), self.rows)
        for row, token in zip(self.rows, self.last):
            row.history.append(token)
        return self.last

    def sample(self, logits: torch.Tensor, rows: list[Row]) -> list[int]:

        greedy = logits.argmax(dim=-1).tolist()
        return [greedy[i] if row.sampling.temperature == 0 and row.sampling.repetition_penalty == 1.0
                else next_token(logits[i], row.history, row.sampling, row.generator) for i, row in enumerate(rows)]

    def reorder_state(self, indices: list[int]) -> None:
        self.last = [self.last[i] for i in indices]
        if not indices:
            self.cache, self.valid = None, None
            return
        index = torch.tensor(indices, device=self.device)
        valid = self.valid[index]
        cut = int(valid.any(dim=0).long().argmax())  # columns that are padding in every row left
        self.valid = valid[:, cut:]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[index, :, cut:], layer.values[index, :, cut:]


def pad_left(tensor: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    """Zeros (False) before `tensor` along `dim` up to `width`: a KV cache [B, H, T, D] (dim 2) or a mask [B, T] (dim 1)."""
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([torch.zeros(shape, dtype=tensor.dtype, device=tensor.device), tensor], dim=dim)


def row_generator(sampling: Sampling, device: torch.device) -> torch.Generator:
    seed = sampling.seed if sampling.seed is not None else random.SystemRandom().getrandbits(63)
    return torch.Generator(device=device).manual_seed(seed)


def batch_engine(model, tokenizer, end_ids: set[int]) -> BatchEngine | None:
    """A BatchEngine for the model, or None when its cache is not transformers' plain DynamicCache
    of full-attention layers (sliding windows and recurrent states are not padded here)."""
    from transformers.cache_utils import DynamicLayer

    with torch.inference_mode():
        probe = model(input_ids=torch.tensor([[0]], device=next(model.parameters()).device), use_cache=True)
    cache = probe.get("cache", probe.get("past_key_values"))
    if cache is None or not hasattr(cache, "layers") or not all(type(layer) is DynamicLayer for layer in cache.layers):
        return None
    return BatchEngine(model, tokenizer, end_ids)
