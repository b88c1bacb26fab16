"""Writing files and folders so that a killed process leaves the old version or the new one,
never half of either: write under a temporary name beside the target, then rename.

What is written gets the permissions any file of the user's gets (their umask): the standard
library's temporary files and folders are private (0600, 0700), which is right for a temporary
secret and wrong for a run folder others on the machine may read.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from mlxft.errors import UserError

# Leftovers of a write cut short: ".NAME.<8 random chars>" (a staging folder), the same with
# ".tmp" (a temporary file) and ".NAME.old" (a folder being replaced). See recover_staged().
_LEFTOVER = re.compile(r"^\.(?P<target>.+)\.(?:[a-z0-9_]{8}(?:\.tmp)?|old)$")


def umask() -> int:
    """The process's umask, read without changing it (os.umask can only set it, and setting it
    even for a moment would give another thread's new file the wrong mode)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    current = os.umask(0o022)  # no /proc (macOS): the only way left is to set it and set it back
    os.umask(current)
    return current


def as_user_file(path: str | Path) -> None:
    os.chmod(path, 0o666 & ~umask())


def as_user_folder(path: str | Path) -> None:
    os.chmod(path, 0o777 & ~umask())


def temporary_file(path: Path, mode: str = "w"):
    """An open file beside `path` (".NAME.xxxxxxxx.tmp"), with the user's permissions; the caller
    renames it over `path` with os.replace when it is complete."""
    f = tempfile.NamedTemporaryFile(mode, encoding="utf-8" if "b" not in mode else None, dir=path.parent,
                                    prefix=f".{path.name}.", suffix=".tmp", delete=False)
    as_user_file(f.name)
    return f


def write_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder; name a file to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    with temporary_file(path) as f:
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
    as_user_folder(staging)
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


def recover_staged(folder: str | Path) -> list[str]:
    """After a kill, in a folder no other process is writing: put back a folder whose replacement
    was cut between its two renames (".NAME.old" with no NAME), and delete what half-finished
    writes left (staging folders, temporary files). Returns the names deleted or restored."""
    folder = Path(folder)
    touched = []
    for entry in sorted(folder.iterdir()):
        match = _LEFTOVER.match(entry.name)
        if match is None:
            continue
        target = folder / match["target"]
        if entry.name.endswith(".old") and not target.exists():
            os.rename(entry, target)  # the old version is the last whole one
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()
        touched.append(entry.name)
    return touched
