"""`mlxft export gguf`: a fused model (or a run / adapter, fused on the way) as one GGUF file for
llama.cpp and Ollama, checked against the folder it came from.

    mlxft export gguf runs/tallrec-20261201/ --out tallrec.gguf --type q8_0 --ollama tallrec
    ollama create tallrec -f Modelfile

Supports the llama family and qwen2 (see mlxft.gguf), f32 / f16 / q8_0 weights. The file is read
back (by mlxft's GGUF reader, the same de-quantization llama.cpp does) and its logits on a fixed
probe batch compared with the source folder's: the largest difference, relative to the largest
logit, must stay under the type's bound, or the export fails and the file is deleted. Raises
UserError for a source that is neither a model folder nor an adapter, an architecture or
tokenizer GGUF has no form for here, and a failed check.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from mlxft.errors import UserError
from mlxft.files import write_atomic
from mlxft.saved_check import FIXED_PROBE, fixed_probe, relative_difference

# Largest |exported - source| logit over the largest |source| logit, per weight type. Measured
# on SmolLM2-135M-Instruct: f32 0, f16 1.0e-3, q8_0 3.2e-2 (benchmarks/RESULTS.md).
TOLERANCE = {"f32": 1e-5, "f16": 5e-3, "q8_0": 6e-2}


def export_gguf(source: str | Path, out: str | Path, kind: str = "f16", *, model: str | None = None,
                ollama_name: str | None = None, echo=print) -> dict:
    from mlxft.adapters import whole_model_folder
    from mlxft.gguf import write_gguf

    source, out = Path(source), Path(out)
    if out.is_dir():
        raise UserError(f"--out {out}: is a folder; name the .gguf file to write")
    with tempfile.TemporaryDirectory(prefix=".mlxft-export-", dir=out.parent if out.parent.exists() else None) as work:
        folder = source if (source / "config.json").exists() else whole_model_folder(source)
        if folder is None:  # an adapter, or a run holding one: fuse it first (MLX, float32 merge)
            from mlxft.backends.mlx.fuse import fuse

            fused = fuse(source, Path(work) / "fused", model=model)
            echo(f"fused {fused.merged_modules} modules of {source} into {fused.base_model}")
            folder = fused.out
        report = write_gguf(folder, out, kind, name=ollama_name or source.name)
        try:
            report["check"] = check_export(folder, out, kind, Path(work) / "read-back")
        except BaseException:
            out.unlink(missing_ok=True)
            raise
        if ollama_name:
            report["modelfile"] = str(write_modelfile(out, folder))
    return report


def check_export(folder: Path, gguf_file: Path, kind: str, scratch: Path) -> dict:
    """Logits of the GGUF file, read back, against the source folder's, on the probe batch."""
    from mlxft.gguf import convert

    scratch.mkdir()
    convert(gguf_file, scratch, echo=lambda *a: None)
    source, exported = _probe_logits(folder), _probe_logits(scratch)
    relative = relative_difference(exported, source)
    check = {"probe_tokens": len(FIXED_PROBE), "max_relative_difference": relative, "tolerance": TOLERANCE[kind]}
    if not relative <= TOLERANCE[kind]:
        raise UserError(f"export check failed: the GGUF file's logits differ from {folder}'s by {relative:.2e} of the "
                        f"largest logit (allowed for {kind}: {TOLERANCE[kind]:g}); the file was deleted")
    return check


def _probe_logits(folder: Path) -> np.ndarray:
    from mlxft.backends.mlx import lora
    from mlxft.backends.mlx.model import load

    model, _, _ = load(str(folder))
    return lora.probe_logits(model, fixed_probe(model.args.vocab_size))


def write_modelfile(gguf_file: Path, folder: Path) -> Path:
    from transformers import AutoTokenizer

    from mlxft.ollama import modelfile

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    path = gguf_file.parent / "Modelfile"
    write_atomic(path, modelfile(gguf_file.name, tokenizer.chat_template, tokenizer.eos_token))
    return path


def describe(report: dict) -> str:
    check = report["check"]
    lines = [f"wrote {report['file']} ({report['architecture']}, {report['type']}, {report['tensors']} tensors, "
             f"{report['bytes'] / 1e6:.1f} MB)",
             f"checked: logits of the file read back differ from the source by {check['max_relative_difference']:.1e} "
             f"of the largest (allowed {check['tolerance']:g})"]
    if report.get("modelfile"):
        lines.append(f"Modelfile: {report['modelfile']} (ollama create NAME -f {report['modelfile']})")
    return "\n".join(lines)
