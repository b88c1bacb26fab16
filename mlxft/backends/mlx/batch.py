"""Continuous batching on MLX for `mlxft serve`: the model's side of mlxft.serve.batcher.

The running batch is a list of rows (one per answer being generated) over one batched KV cache
(mlx-lm's BatchKVCache). New requests join between decode steps: their prompts are run on their
own (those of equal length together, so no row is padded while its prompt runs) and their caches
are merged into the batch's; a finished or cancelled row is filtered out. A decode step runs
every row at once. Each row keeps its own sampling: greedy rows take the argmax of the batch's
logits; a sampled row draws from its own random key (seeded by the request's seed), so a seeded
answer does not depend on what else is in the batch; top_p, top_k and the repetition penalty
are mlx-lm's, applied to the row alone.

mlx-lm's BatchGenerator does the same scheduling, but its rows cannot carry an adapter each (the
model is called with the batch alone) nor a seed each; this loop is short enough to own.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import mlx.core as mx

from mlxft.backends.mlx.adapter_stack import AdapterStack
from mlxft.errors import UserError
from mlxft.generation import RunningBatch, Sampling, length_groups

REPETITION_CONTEXT = 20  # tokens the repetition penalty looks back on, as mlx-lm's default


class RowSampler:
    """One request's sampling: its filters and its own random key."""

    def __init__(self, sampling: Sampling, vocabulary: int):
        from mlx_lm.sample_utils import apply_top_k, apply_top_p, make_repetition_penalty

        self.greedy = sampling.temperature == 0
        self.temperature = sampling.temperature
        self.filters = []
        if 0 < sampling.top_p < 1:
            self.filters.append(lambda logprobs: apply_top_p(logprobs, sampling.top_p))
        if 0 < sampling.top_k < vocabulary:  # past the vocabulary it keeps every token, as 0 does
            self.filters.append(lambda logprobs: apply_top_k(logprobs, sampling.top_k))
        self.penalty = make_repetition_penalty(sampling.repetition_penalty, REPETITION_CONTEXT) \
            if sampling.repetition_penalty != 1.0 else None
        seed = sampling.seed if sampling.seed is not None else random.SystemRandom().getrandbits(63)
        self.key = mx.random.key(seed)

    def draw(self, logprobs: mx.array) -> mx.array:
        for method in self.filters:
            logprobs = method(logprobs)
        self.key, key = mx.random.split(self.key)
        return mx.random.categorical(logprobs * (1 / self.temperature), key=key)


@dataclass
class Row:
    slot: int
    sampler: RowSampler
    history: list[int] = field(default_factory=list)  # prompt and answer so far, for the repetition penalty


class BatchEngine(RunningBatch):
    """The running batch of one model; used from one thread only (the server's model thread)."""

    def __init__(self, model, tokenizer, adapters: AdapterStack):
        self.model = model
        self.tokenizer = tokenizer
        self.adapters = adapters
        self.rows: list[Row] = []
        self.cache = None  # one BatchKVCache per layer, or None while no row runs
        self.last: list[int] = []  # the newest token of each row, the next step's input
        self.vocabulary = model.args.vocab_size if hasattr(model, "args") else 1 << 62
        self.default_slot = 0  # what a request that names no adapter gets

    @property
    def eos_ids(self) -> set[int]:
        return set(self.tokenizer.eos_token_ids)

    def detokenizer(self):
        return self.tokenizer.detokenizer  # a fresh copy per call

    def slot(self, name: str | None) -> int:
        """The adapter slot a request naming `name` runs with (None: the default); KeyError when unknown."""
        if name is None:
            return self.default_slot
        slot = self.adapters.slot(name)
        if slot is None:
            raise KeyError(name)
        return slot

    def add_adapter(self, name: str, spec, weights, where: str, default: bool = False) -> None:
        slot = self.adapters.add(name, spec, weights, where)
        if default:
            self.default_slot = slot

    def remove_adapter(self, name: str) -> None:
        if self.adapters.slot(name) == self.default_slot and self.default_slot:
            raise UserError(f"'{name}' is the adapter the server was started with; it cannot be removed")
        self.adapters.remove(name)
        self.adapters.release({row.slot for row in self.rows})

    def start(self, requests: list[tuple[list[int], Sampling, int]]) -> list[int]:
        """Run the prompts of new requests ((prompt ids, sampling, adapter slot) each), add them to
        the batch, and return each one's first token."""
        from mlx_lm.models.cache import KVCache, make_prompt_cache

        before = len(self.rows)
        plain = all(type(c) is KVCache for c in make_prompt_cache(self.model))
        firsts, joined = {}, []
        for group in length_groups([ids for ids, _, _ in requests], together=plain):
            cache = make_prompt_cache(self.model)
            rows = [Row(requests[i][2], RowSampler(requests[i][1], self.vocabulary), list(requests[i][0])) for i in group]
            self.adapters.rows.set([row.slot for row in rows])
            logits = self.model(mx.array([requests[i][0] for i in group]), cache=cache)[:, -1, :]
            tokens = self.sample(logits, rows)
            self.join(rows, cache, tokens)
            firsts.update(zip(group, tokens))
            joined += group
        self.in_request_order(before, joined)
        return [firsts[i] for i in range(len(requests))]

    def join(self, rows: list[Row], cache, tokens: list[int]) -> None:
        from mlx_lm.models.cache import KVCache

        if len(rows) == 1:
            merged = [layer.merge([layer]) for layer in cache]
        else:  # a KVCache of several rows: one cache per row, then merged (no padding: equal lengths)
            merged = []
            for layer in cache:
                keys, values = layer.keys_and_values()
                singles = []
                for r in range(len(rows)):
                    single = KVCache()
                    single.state = (keys[r:r + 1], values[r:r + 1], layer.offset)
                    singles.append(single)
                merged.append(KVCache.merge(singles))
        if self.cache is None:
            self.cache = merged
        else:
            for mine, theirs in zip(self.cache, merged):
                mine.extend(theirs)
        self.rows.extend(rows)
        for row, token in zip(rows, tokens):
            row.history.append(token)
        self.last = self.last + tokens

    def step(self) -> list[int]:
        """One token more for every row, in row order."""
        self.adapters.rows.set([row.slot for row in self.rows])
        logits = self.model(mx.array(self.last)[:, None], cache=self.cache)[:, -1, :]
        self.last = self.sample(logits, self.rows)
        for row, token in zip(self.rows, self.last):
            row.history.append(token)
        return self.last

    def sample(self, logits: mx.array, rows: list[Row]) -> list[int]:
        if any(row.sampler.penalty for row in rows):
            logits = mx.concatenate([
                row.sampler.penalty(mx.array(row.history[-REPETITION_CONTEXT:]), logits[i:i + 1])
                if row.sampler.penalty else logits[i:i + 1] for i, row in enumerate(rows)])
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        tokens = mx.argmax(logprobs, axis=-1)
        if not all(row.sampler.greedy for row in rows):
            tokens = mx.concatenate([tokens[i:i + 1] if row.sampler.greedy else row.sampler.draw(logprobs[i:i + 1])
                                     for i, row in enumerate(rows)])
        return tokens.tolist()

    def reorder_cache(self, indices: list[int]) -> None:
        if not indices:
            self.cache = None
        else:
            for layer in self.cache:
                layer.filter(indices)
        self.adapters.release({row.slot for row in self.rows})


def batch_engine(model, tokenizer) -> BatchEngine | None:
    """A BatchEngine for the model, or None when its caches cannot be batched (mlx-lm batches a
    cache kind only if it can merge caches)."""
    from mlx_lm.models.cache import make_prompt_cache

    if not all(hasattr(layer, "merge") for layer in make_prompt_cache(model)):
        return None
    return BatchEngine(model, tokenizer, AdapterStack(model))
