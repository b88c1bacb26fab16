"""The peak resident memory of this process, resettable on Linux.

torch on the CPU keeps no allocator statistics, and ru_maxrss cannot be reset, so a benchmark
would count the model load and the warm-up steps. Linux resets the peak (VmHWM) when "5" is
written to /proc/self/clear_refs; elsewhere the lifetime peak stands in.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path


def reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_gb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if sys.platform == "darwin" else 1024) / 1e9  # bytes on macOS, KiB on Linux
