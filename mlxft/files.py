"""Writing files and folders so that a killed process leaves the old version or the new one,
never half of either: write under a temporary name beside the target, then rename."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def write_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, prefix=f".{path.name}.",
                                     suffix=".tmp", delete=False) as f:
        try:
            f.write(text)
        except BaseException:
            f.close()
            Path(f.name).unlink(missing_ok=True)
            raise
    os.replace(f.name, path)


@contextmanager
def staged_folder(folder: str | Path):
    """Yield an empty temporary folder beside `folder`; when the block ends well it replaces
    `folder`, and when it fails it is removed and `folder` stays as it was."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_folder(staging, folder)


def replace_folder(staging: Path, folder: Path) -> None:
    """Put a finished folder in place of an old one without a moment where neither is whole."""
    old = None
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(folder, old)
    os.rename(staging, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
