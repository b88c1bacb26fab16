"""How much memory this process holds, and how much a run may: the figures a run reports beside its
backend's peak, and the guard that stops it cleanly (checkpoint written) before it swaps.

torch on the CPU keeps no allocator statistics, and ru_maxrss cannot be reset, so a benchmark
would count the model load and the warm-up steps. Linux resets the peak (VmHWM) when "5" is
written to /proc/self/clear_refs; elsewhere the lifetime peak stands in.
"""

from __future__ import annotations

import os
import resource
import sys
from pathlib import Path

from mlxft.errors import UserError


def reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_gb() -> float:
    """The process's peak resident size, as the OS counts it (VmHWM; ru_maxrss elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if sys.platform == "darwin" else 1024) / 1e9  # bytes on macOS, KiB on Linux


def machine_memory_gb() -> float | None:
    """The machine's physical memory, or None where the OS does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        return None


class MemoryLimitReached(UserError):
    """A run's peak memory passed train.memory_limit of what its device has; its checkpoint is written."""


def limit_message(peak_gb: float, budget_gb: float, where: str, share: float, step: int) -> str:
    """What a run stopped by train.memory_limit tells its user: how far it went, and what to change."""
    return (f"stopped after step {step}: the run's peak memory, {peak_gb:.2f} GB, passed train.memory_limit={share:g} of "
            f"{where} ({share * budget_gb:.2f} of {budget_gb:.2f} GB); its checkpoint is written. Continue with "
            "--resume and less memory per step (--set train.grad_checkpoint=true or rl.completions_per_pass=N), "
            "or raise train.memory_limit there; or start again with a smaller train.batch_size or data.cutoff")


# The LM head runs on chunks of scored positions (train.head_chunk), each holding a few
# [chunk, vocabulary] float32 arrays at once: sized so that one of them is 16 MB, whatever the
# vocabulary, when train.head_chunk is null.
CHUNK_ELEMENTS = 2**22


def head_chunk_rows(chunk: int | None, vocabulary: int) -> int:
    """Scored positions per chunk for train.head_chunk (None: sized by CHUNK_ELEMENTS; 0: no chunks)."""
    return max(16, CHUNK_ELEMENTS // vocabulary) if chunk is None else chunk
