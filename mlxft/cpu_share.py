"""Compute threads that make room for a busy neighbour on a shared CPU.

A BLAS (OpenBLAS under MLX's CPU backend on Linux, and PyTorch's CPU kernels) splits each matrix
product over one thread per core, and each part waits for the others. When another process takes
a core, the part on that core waits for the scheduler, the rest spin, and the whole run slows far
more than the one core it lost (benchmarks/RESULTS.md, "CPU threads beside a busy neighbour").

So between training steps (and `mlxft serve` between decode steps, or between answers when it
answers one at a time) the driver asks a CpuShare how many cores the *other* processes used
over the last few seconds (the machine's busy time from /proc/stat minus this process's own from
/proc/self/stat) and runs on the cores left: max(1, cores - round(others)). Two runs started side
by side each see the other and settle on half the cores each; when a neighbour leaves, the threads
come back. A change needs two windows in a row that agree, so that one burst does not flip it.

Off (the thread count left as it is) where it cannot help or was chosen by hand: outside Linux
(macOS runs MLX on the GPU), when OPENBLAS_NUM_THREADS or OMP_NUM_THREADS is set, with
MLXFT_CPU_THREADS=off, or MLXFT_CPU_THREADS=N (fixed at N). MLXFT_CPU_THREADS=auto is the default.
A product split over another number of threads adds in another order, so a run whose threads
changed is not bitwise the run it would have been (about 1e-7 relative, float32's rounding); fix
the count for bitwise repeatable runs.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Callable

WINDOW_SECONDS = 2.0  # long enough to average over steps, short enough to follow a neighbour within seconds
USER_ENV = "MLXFT_CPU_THREADS"
FIXED_BY = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")


@dataclass(frozen=True)
class CpuTimes:
    """Cumulative CPU time, in clock ticks: the machine's busy time and this process's (all threads)."""

    machine_busy: int
    own: int
    at: float  # time.monotonic() when read


def read_cpu_times(proc: str = "/proc") -> CpuTimes:
    with open(f"{proc}/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal; guest is inside user
    with open(f"{proc}/self/stat") as f:
        own = f.read().rsplit(")", 1)[1].split()  # the command name may hold spaces; fields follow its ')'
    return CpuTimes(busy, int(own[11]) + int(own[12]), time.monotonic())  # utime, stime


def others_cores(before: CpuTimes, after: CpuTimes, ticks_per_second: float) -> float:
    """How many cores the other processes kept busy between two readings."""
    elapsed = after.at - before.at
    if elapsed <= 0:
        return 0.0
    others = (after.machine_busy - before.machine_busy) - (after.own - before.own)
    return max(0.0, others / ticks_per_second / elapsed)


def threads_for(others: float, cores: int) -> int:
    """The cores the others leave: a neighbour using 0.6 of a core takes one, 0.4 takes none."""
    return max(1, min(cores, cores - round(others)))


def thread_setters() -> list[Callable[[int], None]]:
    """What sets the compute threads of the libraries this process runs: OpenBLAS behind mlxft's
    MLX shim (mlxft.blas), and PyTorch's CPU kernels when torch is loaded."""
    setters = []
    if os.environ.get("MLXFT_BLAS_ACTIVE"):
        try:
            function = ctypes.CDLL(None).scipy_openblas_set_num_threads  # preloaded with the shim
        except AttributeError:
            function = None
        if function is not None:
            function.argtypes = [ctypes.c_int]
            setters.append(lambda n: function(n))
    torch = sys.modules.get("torch")
    if torch is not None:
        setters.append(torch.set_num_threads)
    return setters


def setting() -> int | str | None:
    """MLXFT_CPU_THREADS as given: 'auto', a thread count, or None when the threads are another's to choose (off)."""
    if platform.system() != "Linux":
        return None
    value = os.environ.get(USER_ENV, "auto").strip().lower()
    if value == "off":
        return None
    if value == "auto":
        return None if any(os.environ.get(name) for name in FIXED_BY) else "auto"
    if value.isdigit() and int(value) > 0:
        return int(value)
    from mlxft.errors import UserError

    raise UserError(f"{USER_ENV}={value!r}: use auto, off or a number of threads (at least 1)")


class CpuShare:
    """Call `update()` between steps; it changes the thread count at most once a window, and says so
    through `echo`. No product may run while the count changes: a caller that keeps work in flight
    (MLX's serving engine, a step ahead) passes `settle`, which waits for it, called only then."""

    def __init__(self, echo=print, *, cores: int | None = None, setters: list | None = None,
                 read: Callable[[], CpuTimes] = read_cpu_times, clock: Callable[[], float] = time.monotonic,
                 mode: int | str | None = "from-environment"):
        self.mode = setting() if mode == "from-environment" else mode
        self.cores = cores or len(os.sched_getaffinity(0))
        self.setters = thread_setters() if setters is None else setters
        self.read, self.clock, self.echo = read, clock, echo  # clock: read's CpuTimes.at
        self.ticks = os.sysconf("SC_CLK_TCK")
        self.threads = self.cores
        self.last = None
        self.pending: int | None = None
        if isinstance(self.mode, int):
            self.apply(self.mode)
        elif self.mode == "auto" and self.setters and self.cores > 1:
            self.last = self.read()

    @property
    def active(self) -> bool:
        return self.last is not None

    def update(self, settle: Callable[[], None] | None = None) -> None:
        if not self.active:
            return
        if self.clock() - self.last.at < WINDOW_SECONDS:  # before reading /proc: serving calls this every step
            return
        now = self.read()
        others = others_cores(self.last, now, self.ticks)
        self.last = now
        wanted = threads_for(others, self.cores)
        if wanted == self.threads:
            self.pending = None
        elif self.pending == wanted:  # the second window in a row that asks for it
            self.echo(f"compute threads {self.threads} -> {wanted}: other processes use {others:.1f} of {self.cores} cores")
            if settle is not None:
                settle()
            self.apply(wanted)
            self.pending = None
        else:
            self.pending = wanted

    def apply(self, threads: int) -> None:
        for set_threads in self.setters:
            set_threads(threads)
        self.threads = threads
