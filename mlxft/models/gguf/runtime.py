"""llama.cpp itself, through llama-cpp-python: the program a GGUF file is for, used to judge one.

    pip install 'mlxft[llama-cpp]'     # builds llama.cpp from source once (~10 min on 2 cores);
                                       # pip's wheel cache makes every later install instant

Three things are asked of it: tokenize text as llama.cpp does, give the logits of a token sequence
(greedy answers follow from them, with no sampler in between), and quantize a file with
llama.cpp's own quantizer (the K-quants are llama.cpp's to define). Without the extra, `available()`
is False and `require()` raises a UserError that says how to install it.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from mlxft.errors import UserError

PIN = "llama-cpp-python==0.3.36"  # the version whose vendored llama.cpp the tests certify against
INSTALL = "pip install 'mlxft[llama-cpp]' (it builds llama.cpp once, ~10 minutes on 2 cores)"

# --type -> llama.cpp's LLAMA_FTYPE (include/llama.h), for the types its quantizer makes.
QUANTIZED = {"q4_0": 2, "q8_0": 7, "q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


def require(what: str):
    try:
        import llama_cpp
    except (ImportError, OSError) as e:
        raise UserError(f"{what} needs llama.cpp ({e}); {INSTALL}") from None
    return llama_cpp


def version() -> str:
    return require("llama.cpp").__version__


class Runtime:
    """A GGUF file loaded in llama.cpp on the CPU, with an optional LoRA adapter GGUF."""

    def __init__(self, path: str | Path, lora: str | Path | None = None, context: int = 1024, threads: int | None = None):
        llama_cpp = require("running a GGUF file in llama.cpp")
        try:
            self.llama = llama_cpp.Llama(model_path=str(path), lora_path=str(lora) if lora else None, n_ctx=context,
                                         n_batch=context, n_threads=threads or os.cpu_count(), n_gpu_layers=0,
                                         logits_all=True, verbose=False)
        except (ValueError, RuntimeError) as e:
            raise UserError(f"llama.cpp cannot load {path}{f' with {lora}' if lora else ''}: {e}") from None
        self.context = context

    def tokenize(self, text: str, add_special: bool = True) -> list[int]:
        """Ids as llama.cpp gives them; chat special tokens in the text are parsed as tokens."""
        return list(self.llama.tokenize(text.encode("utf-8"), add_bos=add_special, special=True))

    def logits(self, ids: list[int]) -> np.ndarray:
        """[len(ids), vocab] float32, each row predicting the next token."""
        self.llama.reset()
        self.llama.eval(list(ids))
        return np.array(self.llama.scores[: len(ids)], dtype=np.float32)

    def greedy(self, ids: list[int], max_tokens: int, stop: set[int]) -> tuple[list[int], np.ndarray]:
        """The argmax continuation of `ids` (up to and including a stop token), and the logits each
        new token was chosen from."""
        self.llama.reset()
        self.llama.eval(list(ids))
        tokens, rows = [], []
        for _ in range(min(max_tokens, self.context - len(ids))):
            row = np.array(self.llama.scores[self.llama.n_tokens - 1], dtype=np.float32)
            token = int(row.argmax())
            tokens.append(token)
            rows.append(row)
            if token in stop:
                break
            self.llama.eval([token])
        return tokens, np.stack(rows) if rows else np.zeros((0, 0), np.float32)

    def close(self) -> None:
        self.llama.close()


def quantize(source: Path, out: Path, kind: str, threads: int | None = None) -> None:
    """`source` (an f32 or f16 GGUF) quantized to `kind` by llama.cpp's quantizer into `out`."""
    import ctypes

    llama_cpp = require(f"--type {kind}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANTIZED[kind]
    params.nthread = threads or os.cpu_count() or 1
    with quiet_stderr() as log:  # it reports every tensor on the C library's stderr
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    if status != 0:
        tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
        raise UserError(f"llama.cpp's quantizer failed on {source} for --type {kind} (status {status}): {tail}")


@contextmanager
def quiet_stderr():
    """File descriptor 2 into a temporary file for the block (C code writes there, not to sys.stderr)."""
    import sys
    import tempfile

    sys.stderr.flush()
    with tempfile.TemporaryDirectory() as folder:
        log = Path(folder) / "stderr.txt"
        saved = os.dup(2)
        try:
            with open(log, "w") as f:
                os.dup2(f.fileno(), 2)
                yield log
        finally:
            os.dup2(saved, 2)
            os.close(saved)
