"""The OpenBLAS shim for MLX's CPU backend: built and checked when it can be, skipped safely when not."""

import os
import platform
import shutil
import subprocess
import sys

import pytest

from mlxft import blas

linux_only = pytest.mark.skipif(platform.system() != "Linux", reason="the shim is for Linux's stock mlx[cpu] wheel")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MLXFT_HOME", str(tmp_path))
    monkeypatch.delenv(blas.ACTIVE_ENV, raising=False)
    return tmp_path


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("MLXFT_BLAS", "stock")
    assert not blas.wanted()
    assert "MLXFT_BLAS=stock" in blas.describe() or platform.system() == "Darwin"


@linux_only
def test_no_compiler_means_stock_blas_and_a_reason(cache, monkeypatch):
    monkeypatch.setenv("CC", str(cache / "no-such-compiler"))
    shim, reason = blas.ensure_shim()
    assert shim is None and reason
    # remembered: the next command does not try again
    assert blas.ensure_shim() == (None, reason)
    executed = []
    monkeypatch.setattr(os, "execve", lambda *a: executed.append(a))
    blas.reexec_with_fast_blas(["lora"])
    assert executed == []


@linux_only
@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_shim_builds_checks_and_makes_mlx_products_right(cache, monkeypatch):
    monkeypatch.delenv("CC", raising=False)
    shim, reason = blas.ensure_shim()
    assert shim is not None and shim.exists(), reason
    # MLX in a child process with the shim preloaded computes the same products as numpy, and the
    # cblas_sgemm it calls is the shim's.
    code = ("import ctypes, numpy as np, mlx.core as mx\n"
            "a = np.arange(12, dtype=np.float32).reshape(3, 4); b = np.ones((4, 5), np.float32)\n"
            "assert np.array_equal(np.array(mx.array(a) @ mx.array(b)), a @ b)\n"
            "print(ctypes.CDLL(None).cblas_sgemm is not None)\n")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "LD_PRELOAD": str(shim)},
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    executed = []
    monkeypatch.setattr(os, "execve", lambda path, args, env: executed.append((args, env)))
    blas.reexec_with_fast_blas(["lora", "--recipe", "tallrec"])
    (args, env), = executed
    assert args[1:] == ["-m", "mlxft", "lora", "--recipe", "tallrec"]
    assert env["LD_PRELOAD"].split(":")[0] == str(shim) and env[blas.ACTIVE_ENV] == str(shim)


def test_does_not_reexec_twice(monkeypatch):
    monkeypatch.setenv(blas.ACTIVE_ENV, "/some/shim.so")
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("re-executed inside the re-executed process"))
    blas.reexec_with_fast_blas(["lora"])
