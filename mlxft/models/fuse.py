"""What `mlxft fuse` does the same on every backend: refusing an --out that holds something,
the files a fused folder takes from its base besides the weights, and the check of the fused
folder against base + adapter before it is kept (backends/mlx/fuse.py, backends/torch/fuse.py)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from mlxft.errors import UserError
from mlxft.models.files import TOKENIZER_OUTPUTS

# Everything besides the weights and config.json that a model folder needs to load elsewhere:
# tokenizer files in any of their layouts, generation defaults, and remote code if the model has it.
COPIED_FILES = (*TOKENIZER_OUTPUTS, "generation_config.json", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.json")
COPIED_PATTERNS = ("*.tiktoken", "*.py")

# The fused folder, loaded back, against base + adapter on a probe batch: the largest difference
# relative to the largest logit. A float32 merge is exact up to rounding; bf16/f16 weights round
# the merged sum once; re-quantizing adds quantization noise, which is recorded, not refused.
FUSE_TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2, "float16": 1e-2}


@dataclass
class Fused:
    out: Path
    base_model: str
    merged_modules: int
    quantization: dict | None  # {"group_size", "bits", ...} of the output, None when full precision
    check: dict | None = None  # the fused folder against base + adapter on a probe batch (fused_check)


def check_out(out: Path, force: bool) -> None:
    if out.is_file():
        raise UserError(f"--out {out} is a file; name a folder")
    if out.exists() and any(out.iterdir()) and not force:
        raise UserError(f"--out {out} is not empty; add --force to replace it")


def check_sources(out: Path, *sources: Path) -> None:
    for source in sources:
        if out.resolve() == Path(source).resolve():
            raise UserError(f"--out {out} is where the fuse reads from; name another folder")


def fused_check(relative: float, probe_tokens: int, dtype: str, quantization: dict | None) -> dict:
    """The check's record; a UserError when the fused logits drifted past the tolerance of the
    weights' dtype ('float32', 'bfloat16', 'float16')."""
    check = {"probe_tokens": probe_tokens, "fused_vs_adapted": relative}
    if quantization:
        check["note"] = f"re-quantized to {quantization['bits']} bits: the difference is quantization noise"
        return check
    tolerance = FUSE_TOLERANCE.get(dtype, 3e-2)
    if not relative <= tolerance:
        raise UserError(f"fuse check failed: the fused model's logits differ from base + adapter by {relative:.2e} "
                        f"of the largest (allowed {tolerance:g} for {dtype}); nothing was written")
    return check


def copy_model_files(source: Path, target: Path, config: dict) -> None:
    for name in COPIED_FILES:
        if (source / name).exists():
            shutil.copy(source / name, target / name)
    for pattern in COPIED_PATTERNS:
        for path in source.glob(pattern):
            shutil.copy(path, target / path.name)
    if not (target / "generation_config.json").exists():
        # transformers and mlx-lm read the end-of-sequence id from here when the config lacks it.
        defaults = {key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id") if config.get(key) is not None}
        (target / "generation_config.json").write_text(json.dumps(defaults, indent=2))


def adapter_and_base_name(adapter, model: str | None) -> tuple:
    """(spec, weights, base model name) of the adapter to fuse: --model, else the base it names."""
    from mlxft.models.adapters import load_adapter

    spec, weights = load_adapter(adapter)
    base_name = model or spec.base_model
    if not base_name:
        raise UserError(f"adapter {adapter} does not name its base model (base_model_name_or_path); give --model")
    return spec, weights, base_name
