"""Where the bundled recipes and data samples are: in a checkout, or installed under
<prefix>/share/mlxft by a wheel (see pyproject's data-files)."""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
INSTALLED_ROOT = Path(sys.prefix) / "share" / "mlxft"


def bundled(relative: str) -> Path:
    """Path of a bundled file or folder such as 'recipes/tallrec.yaml' or 'data/mind-sample'."""
    for root in (REPO_ROOT, INSTALLED_ROOT):
        candidate = root / relative
        if candidate.exists():
            return candidate
    return REPO_ROOT / relative  # callers report the missing path
