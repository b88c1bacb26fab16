"""mlxft's cache folder (MLXFT_HOME, default ~/.cache/mlxft): the built-in model, GGUF files
converted to Hugging Face folders, the BLAS shim. Everything in it is built once, under a
temporary name, and renamed into place."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("MLXFT_HOME", Path.home() / ".cache" / "mlxft")).expanduser()


def build_once(target: Path, marker: str, build) -> Path:
    """`target`, built by `build(staging folder)` unless it already holds `marker`."""
    if (target / marker).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build in a temporary sibling and rename: a killed build never leaves half a folder,
    # and two processes building at once both end with a complete one.
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        build(staging)
        try:
            staging.rename(target)
        except OSError:
            if not (target / marker).exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
