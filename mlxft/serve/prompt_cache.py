"""The prompt cache of `mlxft serve`: KV states of finished requests, so that the next request
that starts the same way (a chat's next turn, a new chat behind the same system prompt) runs only
what is new.

An entry is (adapter key, token ids, state): the keys and values a model computed for those ids
under that adapter. A position's keys and values depend only on the tokens up to it, so any common
beginning of an entry and a new prompt can be reused, not just a whole entry: the longest common
prefix over the entries of the same adapter wins, and the engine slices the state to it. At least
the prompt's last token always runs, since its logits give the first answer token.

Entries are keyed by an adapter key that the engine hands out per adapter it loads (a name
reloaded with other weights gets a new key), so a state made under one adapter never serves
another or the base. The cache is bounded in bytes, least recently used out first; an entry that
is a prefix of a newer one of the same adapter is dropped as superseded. Backend-neutral: a state
is whatever the engine stores, with the byte count it gives.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np


def default_bytes() -> int:
    """A tenth of this machine's memory, at most 8 GiB: room for many chats' KV on a small model."""
    import os

    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 8 << 30
    return int(min(memory // 10, 8 << 30))


@dataclass
class Entry:
    adapter: object
    tokens: np.ndarray
    state: object
    nbytes: int


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


class PromptCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[int, Entry] = OrderedDict()  # oldest use first
        self.bytes = 0
        self.next_id = 0
        self.hits = self.misses = self.cached_tokens = self.prompt_tokens = self.evictions = 0
        self.lock = threading.Lock()  # /health reads the figures from another thread

    def lookup(self, adapter, tokens: list[int]) -> tuple[int, object | None]:
        """(n, state): the longest beginning of `tokens` (fewer than all of them) with a state
        under `adapter`, and the entry's state, whose first n positions are that beginning."""
        ids = np.asarray(tokens, dtype=np.int64)
        best, best_id = 0, None
        for key, entry in self.entries.items():
            if entry.adapter == adapter:
                n = common_prefix(entry.tokens, ids[:-1])
                if n > best:
                    best, best_id = n, key
        with self.lock:
            self.prompt_tokens += len(tokens)
            if best_id is None:
                self.misses += 1
                return 0, None
            self.hits += 1
            self.cached_tokens += best
            self.entries.move_to_end(best_id)
        return best, self.entries[best_id].state

    def insert(self, adapter, tokens: list[int], state, nbytes: int) -> bool:
        """File a state for `tokens`; False when it alone exceeds the bound (it is not kept)."""
        if nbytes > self.max_bytes or not tokens:
            return False
        ids = np.asarray(tokens, dtype=np.int64)
        with self.lock:
            for key in [k for k, e in self.entries.items()
                        if e.adapter == adapter and len(e.tokens) <= len(ids) and common_prefix(e.tokens, ids) == len(e.tokens)]:
                self.bytes -= self.entries.pop(key).nbytes
            self.entries[self.next_id] = Entry(adapter, ids, state, nbytes)
            self.next_id += 1
            self.bytes += nbytes
            while self.bytes > self.max_bytes:
                _, evicted = self.entries.popitem(last=False)
                self.bytes -= evicted.nbytes
                self.evictions += 1
        return True

    def forget(self, adapter) -> None:
        """Drop every entry made under `adapter` (it was removed)."""
        with self.lock:
            for key in [k for k, e in self.entries.items() if e.adapter == adapter]:
                self.bytes -= self.entries.pop(key).nbytes

    def figures(self) -> dict:
        with self.lock:
            return {"entries": len(self.entries), "bytes": self.bytes, "max_bytes": self.max_bytes, "hits": self.hits,
                    "misses": self.misses, "cached_tokens": self.cached_tokens, "prompt_tokens": self.prompt_tokens,
                    "evictions": self.evictions}
