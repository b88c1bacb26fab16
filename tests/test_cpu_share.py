"""Compute threads beside a busy neighbour (mlxft.cpu_share): the /proc arithmetic, the decision
with its two-window hysteresis, who may switch it off, and the OpenBLAS symbol it calls."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from mlxft import cpu_share
from mlxft.cpu_share import CpuShare, CpuTimes, others_cores, read_cpu_times, threads_for
from mlxft.errors import UserError


def write_proc(folder, busy_parts, utime, stime):
    (folder / "self").mkdir(exist_ok=True)
    (folder / "stat").write_text("cpu  " + " ".join(map(str, busy_parts)) + " 0 0\ncpu0 1 2 3 4\n")
    # a command name with a space and a ')' in it: fields are counted from the last ')'
    (folder / "self" / "stat").write_text(f"4242 (python (x) y) R 1 2 3 4 5 6 7 8 9 10 {utime} {stime} 0 0 20 0 3\n")


def test_cpu_times_are_read_from_proc_as_busy_and_own_ticks(tmp_path):
    # user nice system idle iowait irq softirq steal
    write_proc(tmp_path, [100, 5, 20, 1000, 50, 3, 2, 1], utime=40, stime=7)
    times = read_cpu_times(str(tmp_path))
    assert (times.machine_busy, times.own) == (131, 47)


def test_others_use_is_the_machines_busy_time_less_this_process():
    before, after = CpuTimes(1000, 300, 10.0), CpuTimes(1500, 450, 12.0)
    # 500 busy ticks in 2 s, 150 of them ours: 350 ticks / 100 per s / 2 s = 1.75 cores
    assert others_cores(before, after, 100) == pytest.approx(1.75)
    assert others_cores(after, CpuTimes(1500, 450, 12.0), 100) == 0.0  # no time passed


@pytest.mark.parametrize("others, cores, threads", [(0.0, 2, 2), (0.4, 2, 2), (0.6, 2, 1), (1.0, 2, 1), (3.0, 2, 1),
                                                    (2.2, 8, 6), (0.0, 1, 1)])
def test_threads_are_the_cores_the_others_leave(others, cores, threads):
    assert threads_for(others, cores) == threads


class Clock:
    """Readings where 'others' cores are busy for the next window of 2.5 s."""

    def __init__(self):
        self.now = CpuTimes(0, 0, 0.0)

    def advance(self, others: float, seconds: float = 2.5) -> CpuTimes:
        self.now = CpuTimes(self.now.machine_busy + int(others * 100 * seconds), self.now.own, self.now.at + seconds)
        return self.now


def share_with(clock, cores=2):
    applied, said = [], []
    share = CpuShare(said.append, cores=cores, setters=[applied.append], read=lambda: clock.now, clock=lambda: clock.now.at,
                     mode="auto")
    share.ticks = 100
    return share, applied, said


def test_a_neighbour_for_two_windows_takes_a_thread_and_gives_it_back_when_it_leaves():
    clock = Clock()
    share, applied, said = share_with(clock)
    clock.advance(1.0)
    share.update()
    assert applied == []  # one window is not enough
    clock.advance(1.0)
    share.update()
    assert applied == [1] and share.threads == 1 and "2 -> 1" in said[0]
    for _ in range(2):
        clock.advance(0.0)
        share.update()
    assert applied == [1, 2]


def test_one_busy_window_between_quiet_ones_changes_nothing():
    clock = Clock()
    share, applied, _ = share_with(clock)
    for others in (1.0, 0.0, 1.0, 0.0, 1.2, 0.1):
        clock.advance(others)
        share.update()
    assert applied == []


def test_readings_closer_than_a_window_are_not_judged():
    clock = Clock()
    share, applied, _ = share_with(clock)
    for _ in range(3):  # 1.5 s of a busy neighbour in all: less than one window
        clock.advance(1.0, seconds=0.5)
        share.update()
    assert applied == [] and share.pending is None and share.last.at == 0.0


def test_thread_counts_chosen_by_hand_are_left_alone(monkeypatch):
    monkeypatch.setattr(cpu_share.platform, "system", lambda: "Linux")
    monkeypatch.delenv("MLXFT_CPU_THREADS", raising=False)
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    assert cpu_share.setting() is None
    monkeypatch.delenv("OPENBLAS_NUM_THREADS")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert cpu_share.setting() == "auto"
    monkeypatch.setenv("MLXFT_CPU_THREADS", "1")
    applied = []
    share = CpuShare(print, cores=2, setters=[applied.append])
    assert applied == [1] and not share.active  # fixed: set once, never adapted
    monkeypatch.setenv("MLXFT_CPU_THREADS", "off")
    assert cpu_share.setting() is None
    monkeypatch.setenv("MLXFT_CPU_THREADS", "many")
    with pytest.raises(UserError, match="MLXFT_CPU_THREADS='many': use auto, off or a number"):
        cpu_share.setting()
    monkeypatch.setattr(cpu_share.platform, "system", lambda: "Darwin")
    assert cpu_share.setting() is None


def test_a_spinning_neighbour_is_seen_as_about_one_core():
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # let it start
        before = read_cpu_times()
        time.sleep(1.0)
        seen = others_cores(before, read_cpu_times(), os.sysconf("SC_CLK_TCK"))
    finally:
        spinner.kill()
        spinner.wait()
    assert seen >= 0.8  # it alone keeps one core busy; other work on the machine only adds


@pytest.mark.skipif(sys.platform != "linux", reason="the OpenBLAS shim is for MLX on Linux")
def test_the_setter_changes_the_preloaded_openblas_thread_count():
    from mlxft.blas import ensure_shim, preload_value

    shim, why = ensure_shim()
    if shim is None:
        pytest.skip(f"no BLAS shim here: {why}")
    script = ("import ctypes; from mlxft.cpu_share import thread_setters; setters = thread_setters(); "
              "[s(1) for s in setters]; print(len(setters), ctypes.CDLL(None).scipy_openblas_get_num_threads())")
    env = {**os.environ, "LD_PRELOAD": preload_value(shim), "MLXFT_BLAS_ACTIVE": str(shim), "OPENBLAS_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True).stdout.split()
    assert out == ["1", "1"]  # one setter (no torch loaded), and OpenBLAS now runs 1 thread, not the 2 it started with
