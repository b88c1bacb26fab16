"""Continuous batching on MLX for `mlxft serve`: the model's side of mlxft.serve.scheduler.

The running batch is a list of rows (one per answer being generated) over one batched KV cache
(mlx-lm's BatchKVCache). New requests join between decode steps: their prompts are run on their
own (those of equal length together, so no row is padded while its prompt runs) and their caches
are merged into the batch's; a finished or cancelled row is filtered out. A decode step runs
every row at once.

The engine runs one step ahead, as mlx-lm's BatchGenerator does: step() hands out the tokens of
the step queued last and queues the next one before it returns, so the model computes while the
server turns tokens into text (MLX evaluates on a thread of its own; on a CPU, much of a step
still runs on the calling thread). Rows that joined get their first token from the next step(),
as soon as their prompts have run; a row that ends has computed one token more than it needed,
which is dropped with it.

Each row keeps its own sampling: greedy rows take the argmax of the batch's logits; a sampled row
draws from its own random key (seeded by the request's seed), so a seeded answer does not depend
on what else is in the batch; top_p, top_k and the repetition penalty are mlx-lm's, applied to
the row alone.

With a prompt cache (mlxft.serve.prompt_cache), each new request runs on its own: it starts from
the keys and values of the longest beginning it shares with an earlier prompt or answer of the same
adapter, runs only the rest, and files its prompt at once, so that requests arriving together
behind one system prompt compute it once; a finished row files its prompt and answer before it leaves.

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
        self.last: mx.array | None = None  # each row's token not yet handed out (computed one step ahead)
        self.vocabulary = model.args.vocab_size if hasattr(model, "args") else 1 << 62
        self.default_slot = 0  # what a request that names no adapter gets
        self.prompt_cache = None  # a PromptCache, set by the server
        self.cached: list[int] = []  # per request of the last start(): prompt tokens taken from the cache
        self.adapter_keys = {0: 0}  # slot -> the key its prompt-cache entries are filed under (0: the base)
        self.next_key = 1

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
        self.adapter_keys[slot], self.next_key = self.next_key, self.next_key + 1  # a new key even for a reused name
        if default:
            self.default_slot = slot

    def remove_adapter(self, name: str) -> None:
        if self.adapters.slot(name) == self.default_slot and self.default_slot:
            raise UserError(f"'{name}' is the adapter the server was started with; it cannot be removed")
        slot = self.adapters.slot(name)
        self.adapters.remove(name)
        if self.prompt_cache is not None and slot in self.adapter_keys:
            self.prompt_cache.forget(self.adapter_keys[slot])
        self.adapters.release({row.slot for row in self.rows})

    def start(self, requests: list[tuple[list[int], Sampling, int]]) -> None:
        """Run the prompts of new requests ((prompt ids, sampling, adapter slot) each) and add them
        to the batch, in the order asked; each one's first token comes with the next step()."""
        from mlx_lm.models.cache import KVCache, make_prompt_cache

        before = len(self.rows)
        plain = all(type(c) is KVCache for c in make_prompt_cache(self.model))
        self.cached = [0] * len(requests)
        if self.prompt_cache is not None and plain:
            # One at a time, each filing its prompt before the next looks: requests that start alike
            # (new chats behind one system prompt) compute that beginning once, even in one call.
            for i, (ids, sampling, slot) in enumerate(requests):
                self.cached[i] = self.start_from_cache(ids, sampling, slot)
            return
        joined = []
        for group in length_groups([ids for ids, _, _ in requests], together=plain):
            cache = make_prompt_cache(self.model)
            rows = [Row(requests[i][2], RowSampler(requests[i][1], self.vocabulary), list(requests[i][0])) for i in group]
            self.adapters.rows.set([row.slot for row in rows])
            logits = self.model(mx.array([requests[i][0] for i in group]), cache=cache)[:, -1, :]
            self.join(rows, cache, self.sample(logits, rows))
            joined += group
        self.in_request_order(before, joined)

    def start_from_cache(self, ids: list[int], sampling: Sampling, slot: int) -> int:
        """Add one request, its prompt's longest cached beginning taken from the prompt cache and
        the rest run; its prompt then filed there. Returns the prompt tokens taken from the cache."""
        from mlx_lm.models.cache import KVCache

        key = self.adapter_keys[slot]
        n, state = self.prompt_cache.lookup(key, ids)
        cache = []
        for layer_state in state or [None] * len(self.model.layers):
            layer = KVCache()
            if layer_state is not None:  # sliced: new arrays, so the entry stays as it is
                layer.state = (layer_state[0][..., :n, :], layer_state[1][..., :n, :], n)
            cache.append(layer)
        row = Row(slot, RowSampler(sampling, self.vocabulary), list(ids))
        self.adapters.rows.set([slot])
        logits = self.model(mx.array([ids[n:]]), cache=cache)[:, -1, :]
        tokens = self.sample(logits, [row])
        self.file(key, ids, [(layer.keys[..., : layer.offset, :], layer.values[..., : layer.offset, :]) for layer in cache])
        self.join([row], cache, tokens)
        return n

    def file(self, key, tokens: list[int], state: list[tuple[mx.array, mx.array]]) -> None:
        mx.eval(state)  # copies of this row alone: the entry keeps no batch buffer alive
        self.prompt_cache.insert(key, tokens, state, sum(keys.nbytes + values.nbytes for keys, values in state))

    def remember(self, indices: list[int]) -> None:
        """File these rows' prompts and answers (their keys and values) in the prompt cache; called
        for rows that finished, before they leave. The cache holds what was fed to the model: the
        row's history, whose last token's keys and values the step ahead already computed."""
        if self.prompt_cache is None or self.cache is None:
            return
        for i in indices:
            row = self.rows[i]
            layers = [layer.extract(i) for layer in self.cache]
            state = [(layer.keys, layer.values) for layer in layers]
            if any(keys.shape[2] != len(row.history) for keys, _ in state):
                continue  # not the row's own tokens: file nothing rather than something wrong
            self.file(self.adapter_keys[row.slot], row.history, state)

    def join(self, rows: list[Row], cache, tokens: mx.array) -> None:
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
        self.last = tokens if self.last is None else mx.concatenate([self.last, tokens])

    def step(self) -> list[int]:
        """Each row's next token, in row order; the step after it is queued before this returns."""
        handed = self.last
        # Evaluated on its own first: an array evaluated only inside the next step's graph is ready
        # when that whole graph is. After start() or keep(), `last` is a new array (the prompts'
        # first tokens, the rows kept), and handing it out would wait for the step ahead.
        mx.async_eval(handed)
        self.adapters.rows.set([row.slot for row in self.rows])
        logits = self.model(handed[:, None], cache=self.cache)[:, -1, :]
        self.last = self.sample(logits, self.rows, handed)
        mx.async_eval(self.last)
        tokens = handed.tolist()
        for row, token in zip(self.rows, tokens):
            row.history.append(token)
        return tokens

    def settle(self) -> None:
        """Wait for the step ahead: nothing computes once this returns (the thread count may change)."""
        mx.synchronize()

    def sample(self, logits: mx.array, rows: list[Row], newest: mx.array | None = None) -> mx.array:
        """Each row's next token (not yet evaluated). `newest`: the tokens the logits follow, when
        they are not yet in the rows' histories (the step ahead's input)."""
        if any(row.sampler.penalty for row in rows):
            def context(i: int, row: Row) -> mx.array:
                seen = mx.array(row.history[-REPETITION_CONTEXT:])
                return seen if newest is None else mx.concatenate([seen, newest[i:i + 1]])[-REPETITION_CONTEXT:]

            logits = mx.concatenate([row.sampler.penalty(context(i, row), logits[i:i + 1])
                                     if row.sampler.penalty else logits[i:i + 1] for i, row in enumerate(rows)])
        # Greedy rows too take the argmax of the log-probabilities, as mlx-lm does: subtracting the
        # logsumexp can round two nearly tied logits to one value (the first then wins), and a greedy
        # answer must be mlx-lm's token for token (benchmarks/RESULTS.md, serving: what skipping it saves).
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        tokens = mx.argmax(logprobs, axis=-1)
        if not all(row.sampler.greedy for row in rows):
            tokens = mx.concatenate([tokens[i:i + 1] if row.sampler.greedy else row.sampler.draw(logprobs[i:i + 1])
                                     for i, row in enumerate(rows)])
        return tokens

    def reorder_state(self, indices: list[int]) -> None:
        if not indices:
            self.cache, self.last = None, None
        else:
            for layer in self.cache:
                layer.filter(indices)
            self.last = self.last[mx.array(indices)]
        self.adapters.release({row.slot for row in self.rows})


def batch_engine(model, tokenizer) -> BatchEngine | None:
    """A BatchEngine for the model, or None when its caches cannot be batched (mlx-lm batches a
    cache kind only if it can merge caches)."""
    from mlx_lm.models.cache import make_prompt_cache

    if not all(hasattr(layer, "merge") for layer in make_prompt_cache(model)):
        return None
    return BatchEngine(model, tokenizer, AdapterStack(model))
