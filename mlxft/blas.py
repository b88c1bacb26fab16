"""Fast matrix products for MLX's CPU backend on Linux.

The stock `mlx[cpu]` wheel for Linux links a reference BLAS whose matrix products run ~30x
slower than an optimized one. libmlx finds `cblas_sgemm` through the dynamic linker, so a
library preloaded before the process starts replaces it. mlxft compiles a tiny shim once into
its cache (`cblas_sgemm` -> scipy-openblas32's `scipy_cblas_sgemm`; that package ships OpenBLAS
with prefixed names, so it cannot be preloaded as it is), checks in a child process that MLX's
products are right with it, and the `mlxft` command then re-executes itself with the shim in
LD_PRELOAD. When anything is missing (no C compiler, no scipy-openblas32, a failed check),
mlxft keeps the stock BLAS and `mlxft doctor` says why. MLXFT_BLAS=stock turns it off.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SHIM_SOURCE = r"""
/* mlxft: route MLX's cblas_sgemm / cblas_dgemm to scipy-openblas32's prefixed symbols. */
void scipy_cblas_sgemm(int, int, int, int, int, int, float, const float *, int, const float *, int,
                       float, float *, int);
void scipy_cblas_dgemm(int, int, int, int, int, int, double, const double *, int, const double *,
                       int, double, double *, int);
void cblas_sgemm(int order, int ta, int tb, int m, int n, int k, float alpha, const float *a,
                 int lda, const float *b, int ldb, float beta, float *c, int ldc) {
  scipy_cblas_sgemm(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
void cblas_dgemm(int order, int ta, int tb, int m, int n, int k, double alpha, const double *a,
                 int lda, const double *b, int ldb, double beta, double *c, int ldc) {
  scipy_cblas_dgemm(order, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
"""

# Run with the shim preloaded: MLX's product must match numpy's, and must come out of the shim.
SELF_CHECK = """
import numpy as np, mlx.core as mx
a = np.random.default_rng(0).standard_normal((67, 45)).astype(np.float32)
b = np.random.default_rng(1).standard_normal((45, 38)).astype(np.float32)
c = np.array(mx.matmul(mx.array(a), mx.array(b)))
assert np.allclose(c, a @ b, atol=1e-4), "wrong products"
"""

ACTIVE_ENV = "MLXFT_BLAS_ACTIVE"  # set in the re-executed process: the shim's path


def wanted() -> bool:
    """Linux, and not switched off: the only place the stock MLX wheel needs help."""
    return platform.system() == "Linux" and os.environ.get("MLXFT_BLAS", "auto") != "stock"


def shim_folder() -> Path:
    import scipy_openblas32

    from mlxft.models.cache import cache_root

    key = hashlib.sha256((SHIM_SOURCE + scipy_openblas32.get_lib_dir() + sys.version).encode()).hexdigest()[:12]
    return cache_root() / "blas" / key


def ensure_shim() -> tuple[Path | None, str]:
    """(path of a checked shim, '') or (None, why not)."""
    try:
        import scipy_openblas32
    except ImportError:
        return None, "scipy-openblas32 is not installed"
    folder = shim_folder()
    shim = folder / "libmlxft_blas.so"
    if (folder / "checked").exists():
        return shim, ""
    if (folder / "failed").exists():
        return None, (folder / "failed").read_text().strip()
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None, "no C compiler (cc) to build the BLAS shim"
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        source = Path(tmp) / "shim.c"
        source.write_text(SHIM_SOURCE)
        built = Path(tmp) / shim.name
        lib_dir = scipy_openblas32.get_lib_dir()
        command = [compiler, "-O2", "-shared", "-fPIC", str(source), "-o", str(built), f"-L{lib_dir}",
                   f"-l{scipy_openblas32.get_library()}", f"-Wl,-rpath,{lib_dir}"]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            return _failed(folder, f"the C compiler {compiler} could not run ({e})")
        if result.returncode != 0:
            return _failed(folder, f"the BLAS shim did not compile: {result.stderr.strip().splitlines()[-1:]}")
        os.replace(built, shim)
    check = subprocess.run([sys.executable, "-c", SELF_CHECK], capture_output=True, text=True,
                           env={**os.environ, "LD_PRELOAD": preload_value(shim)}, timeout=120)
    if check.returncode != 0:
        return _failed(folder, f"MLX with the BLAS shim failed its check: {check.stderr.strip().splitlines()[-1:]}")
    (folder / "checked").write_text("ok\n")
    return shim, ""


def _failed(folder: Path, reason: str) -> tuple[None, str]:
    # Remembered, so a machine without a compiler does not try again on every command.
    (folder / "failed").write_text(reason + "\n")
    return None, reason


def preload_value(shim: Path) -> str:
    existing = os.environ.get("LD_PRELOAD", "")
    return f"{shim}:{existing}" if existing else str(shim)


def reexec_with_fast_blas(argv: list[str], module: str = "mlxft") -> None:
    """Replace this process (`python -m module argv`) with itself plus the shim preloaded; return if
    that cannot be done."""
    if not wanted() or os.environ.get(ACTIVE_ENV):
        return
    try:
        shim, _ = ensure_shim()
    except Exception:  # never let the speed-up stop the command itself
        return
    if shim is None:
        return
    env = {**os.environ, "LD_PRELOAD": preload_value(shim), ACTIVE_ENV: str(shim)}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", module, *argv], env)


def describe() -> str:
    """Which BLAS MLX uses in this process, for `mlxft doctor` and benchmark headers."""
    if platform.system() == "Darwin":
        return "Accelerate / Metal (macOS)"
    shim = os.environ.get(ACTIVE_ENV)
    if shim and shim in os.environ.get("LD_PRELOAD", ""):
        return f"OpenBLAS from scipy-openblas32, through mlxft's shim ({shim})"
    if not wanted():
        return "reference BLAS of the mlx[cpu] wheel (MLXFT_BLAS=stock)"
    return "reference BLAS of the mlx[cpu] wheel (slow: see `mlxft doctor`)"
