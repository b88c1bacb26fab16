"""`mlxft export gguf`: a model (or a run / adapter, fused on the way), or an adapter on its own, as
GGUF for llama.cpp and Ollama, certified by llama.cpp itself before it is kept.

    mlxft export gguf runs/tallrec-20261201/ --out tallrec.gguf --type q4_k_m --ollama tallrec
    mlxft export gguf runs/tallrec-20261201/ --adapter-only --out tallrec-lora.gguf --base smollm2.gguf --ollama tallrec
    ollama create tallrec -f Modelfile

Types: f32, f16, q8_0 (written by mlxft), q4_0, q4_k_m, q5_k_m, q6_k (llama.cpp's quantizer; they
need the `llama-cpp` extra). Architectures: see mlxft.models.gguf.names.

Order of work: everything is written into a hidden folder beside --out; with llama.cpp installed
(`pip install 'mlxft[llama-cpp]'`) the file is certified there (mlxft.models.gguf.certify), and only a
passed certificate moves the file to --out, with the certificate beside it (FILE.certificate.json)
and the Modelfile. Without llama.cpp the file is read back by mlxft's own reader where it can, and
the export says plainly that llama.cpp never ran it. Raises UserError for an existing --out without
--force, a source that is neither a model nor an adapter, an architecture or tokenizer GGUF has no
form for here, a DoRA adapter or one with whole modules under --adapter-only, and a failed check;
after any of them nothing is left at --out.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np

from mlxft.errors import UserError
from mlxft.files import write_atomic
from mlxft.train.saved_check import FIXED_PROBE, fixed_probe, relative_difference

# mlxft's own read-back (no llama.cpp): largest |exported - source| logit over the largest |source|
# logit, per weight type. Measured on SmolLM2-135M-Instruct: f32 0, f16 1.0e-3, q8_0 3.2e-2.
TOLERANCE = {"f32": 1e-5, "f16": 5e-3, "q8_0": 6e-2}


def certificate_path(gguf_file: Path) -> Path:
    return gguf_file.with_name(f"{gguf_file.stem}.certificate.json")


def check_out(out: Path, force: bool) -> None:
    if out.is_dir():
        raise UserError(f"--out {out}: is a folder; name the .gguf file to write")
    if out.exists() and not force:
        raise UserError(f"--out {out} exists; add --force to replace it")


def export_gguf(source: str | Path, out: str | Path, kind: str = "f16", *, model: str | None = None,
                ollama_name: str | None = None, force: bool = False, adapter_only: bool = False,
                base_gguf: str | Path | None = None, echo=print) -> dict:
    from mlxft.models.gguf import runtime

    source, out = Path(source), Path(out)
    check_out(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    if ollama_name and adapter_only and base_gguf is None:
        raise UserError("--ollama with --adapter-only needs --base BASE.gguf: the Modelfile's FROM")
    modelfile_path = out.parent / "Modelfile"
    if ollama_name and modelfile_path.exists() and not force:
        raise UserError(f"{modelfile_path} exists; add --force to replace it")
    with tempfile.TemporaryDirectory(prefix=".mlxft-export-", dir=out.parent) as work:
        work = Path(work)
        staged = work / out.name
        if adapter_only:
            report, folder = _write_adapter(source, staged, model, echo)
        else:
            report, folder = _write_model(source, staged, kind, model, ollama_name, work, echo)
        if runtime.available():
            certificate = _certify(report, staged, folder, kind, adapter_only, source, base_gguf, work, echo)
            report["certificate"] = certificate
            if not certificate["passed"]:
                raise UserError(f"the export of {source} failed its certificate in llama.cpp, so nothing was kept: "
                                + "; ".join(certificate["failures"]))
        elif not adapter_only and kind in TOLERANCE:
            report["check"] = check_export(folder, staged, kind, work / "read-back")
        os.replace(staged, out)
        report["file"] = str(out)
        if "certificate" in report:
            report["certificate"]["file"] = str(out)
            write_atomic(certificate_path(out), json.dumps(report["certificate"], indent=2) + "\n")
        if ollama_name:
            report["modelfile"] = str(write_modelfile(out, folder, modelfile_path, base_gguf if adapter_only else None))
    return report


def _write_model(source: Path, staged: Path, kind: str, model, name, work: Path, echo) -> tuple[dict, Path]:
    from mlxft.models.adapters import whole_model_folder
    from mlxft.models.gguf.write import write_gguf

    folder = source if (source / "config.json").exists() else whole_model_folder(source)
    if folder is None:  # an adapter, or a run holding one: fuse it first (MLX, float32 merge)
        from mlxft.backends.mlx.fuse import fuse

        fused = fuse(source, work / "fused", model=model)
        echo(f"fused {fused.merged_modules} modules of {source} into {fused.base_model}")
        folder = fused.out
    return write_gguf(folder, staged, kind, name=name or source.name), folder


def _write_adapter(source: Path, staged: Path, model, echo) -> tuple[dict, Path]:
    from mlxft.models.adapters import CONFIG_FILE, AdapterSpec, adapter_folder
    from mlxft.models.files import resolve_model_dir
    from mlxft.models.gguf.adapter import write_adapter_gguf

    where = adapter_folder(source)
    spec = AdapterSpec.from_peft(json.loads((where / CONFIG_FILE).read_text()), str(where))
    base = model or spec.base_model
    if not base:
        raise UserError(f"adapter {where} names no base model; give --model")
    folder = resolve_model_dir(base)
    report = write_adapter_gguf(where, folder, staged)
    report["adapter"] = str(where)
    return report, folder


def _certify(report: dict, staged: Path, folder: Path, kind: str, adapter_only: bool, source: Path, base_gguf, work: Path,
             echo) -> dict:
    from mlxft.models.gguf.certify import certify
    from mlxft.models.gguf.write import write_gguf

    echo("certifying in llama.cpp: tokens, greedy answers and logits against mlxft ...")
    if not adapter_only:
        return certify(staged, folder, kind)
    if base_gguf is None:  # the base as f32 for the check only: what mlxft computes, nothing rounded
        base_gguf, base_kind = work / "base-f32.gguf", "f32"
        write_gguf(folder, base_gguf, "f32")
    else:
        base_kind = file_type(Path(base_gguf))
    return certify(base_gguf, folder, base_kind, lora_file=staged, adapter=report["adapter"])


def file_type(path: Path) -> str:
    """f32 / f16 / another type, from a GGUF file's general.file_type (llama.cpp's LLAMA_FTYPE)."""
    import gguf

    if not path.is_file():
        raise UserError(f"--base {path}: no such GGUF file")
    field = gguf.GGUFReader(str(path)).fields.get("general.file_type")
    number = int(field.contents()) if field is not None else -1
    return {0: "f32", 1: "f16"}.get(number, f"type {number}")


def check_export(folder: Path, gguf_file: Path, kind: str, scratch: Path) -> dict:
    """Logits of the GGUF file read back by mlxft's own reader, against the source folder's: the
    check there is when llama.cpp is not installed (it proves the weights, not the tokenizer)."""
    import gguf

    from mlxft.models.gguf.names import READABLE
    from mlxft.models.gguf.read import convert

    if gguf.GGUFReader(str(gguf_file)).fields["general.architecture"].contents() not in READABLE:
        return {"skipped": "mlxft's reader does not read this architecture back"}
    scratch.mkdir()
    convert(gguf_file, scratch, echo=lambda *a: None)
    source, exported = _probe_logits(folder), _probe_logits(scratch)
    relative = relative_difference(exported, source)
    check = {"probe_tokens": len(FIXED_PROBE), "max_relative_difference": relative, "tolerance": TOLERANCE[kind]}
    if not relative <= TOLERANCE[kind]:
        raise UserError(f"export check failed: the GGUF file's logits differ from {folder}'s by {relative:.2e} of the "
                        f"largest logit (allowed for {kind}: {TOLERANCE[kind]:g}); nothing was kept")
    return check


def _probe_logits(folder: Path) -> np.ndarray:
    from mlxft.backends.mlx import lora
    from mlxft.backends.mlx.model import load

    model, _, _ = load(str(folder))
    return lora.probe_logits(model, fixed_probe(model.args.vocab_size))


def write_modelfile(gguf_file: Path, folder: Path, path: Path, base_gguf=None) -> Path:
    from transformers import AutoTokenizer

    from mlxft.models.ollama import modelfile

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if base_gguf is None:
        text = modelfile(relative_to(gguf_file, path.parent), tokenizer)
    else:
        text = modelfile(relative_to(Path(base_gguf), path.parent), tokenizer, adapter=relative_to(gguf_file, path.parent))
    write_atomic(path, text)
    return path


def relative_to(file: Path, folder: Path) -> str:
    """How a Modelfile in `folder` names `file`: ./NAME beside it, else the absolute path."""
    file = file.resolve()
    return f"./{file.name}" if file.parent == folder.resolve() else str(file)


def describe(report: dict) -> str:
    from mlxft.models.gguf.certify import describe as describe_certificate
    from mlxft.models.gguf.runtime import INSTALL

    what = (f"LoRA adapter, r {report['r']}, alpha {report['alpha']:g} for llama.cpp" if report["type"] == "lora"
            else f"{report['type']}")
    lines = [f"wrote {report['file']} ({report['architecture']}, {what}, {report['tensors']} tensors, "
             f"{report['bytes'] / 1e6:.1f} MB)"]
    if report.get("tokenizer", {}).get("pre"):
        lines.append(f"tokenizer: byte-level BPE, llama.cpp pre-tokenizer '{report['tokenizer']['pre']}'")
    if "certificate" in report:
        lines += describe_certificate(report["certificate"])
        lines.append(f"certificate: {certificate_path(Path(report['file']))}")
    else:
        lines.append(f"NOT run in llama.cpp: llama-cpp-python is not installed. To have the file certified: {INSTALL}, "
                     "then export again")
        check = report.get("check")
        if check and "max_relative_difference" in check:
            lines.append(f"read back by mlxft's own reader: logits differ from the source by "
                         f"{check['max_relative_difference']:.1e} of the largest (allowed {check['tolerance']:g})")
    if report.get("modelfile"):
        lines.append(f"Modelfile: {report['modelfile']} (ollama create NAME -f {report['modelfile']})")
    return "\n".join(lines)
