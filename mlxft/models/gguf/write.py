"""A Hugging Face folder (full precision) as one GGUF file that llama.cpp and Ollama run.

f32, f16 and q8_0 are written here (the `gguf` package's Q8_0 is llama.cpp's block format); q4_0,
q4_k_m, q5_k_m and q6_k are made from an f16 file by llama.cpp's own quantizer (mlxft.models.gguf.runtime),
which chooses the per-tensor types of a K-quant mix as llama-quantize does. Norms and biases stay f32.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mlxft.errors import UserError
from mlxft.models.gguf.names import architecture, as_written, gguf_name
from mlxft.models.gguf.runtime import QUANTIZED
from mlxft.models.gguf.vocab import add_tokenizer

WRITTEN = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}
TYPES = [*WRITTEN, *(k for k in QUANTIZED if k not in WRITTEN)]
FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7}  # llama.cpp's LLAMA_FTYPE numbers


def rope_settings(config: dict) -> tuple[float, dict | None]:
    """(base frequency, scaling) of the global attention, from either transformers layout: a
    top-level rope_theta / rope_scaling, or transformers 5's rope_parameters (flat, or per layer type)."""
    rope = config.get("rope_parameters") if isinstance(config.get("rope_parameters"), dict) else {}
    rope = rope.get("full_attention", rope) if isinstance(rope.get("full_attention"), dict) else rope
    base = float(config.get("rope_theta", rope.get("rope_theta", 10000.0)))
    scaling = config.get("rope_scaling") or ({k: v for k, v in rope.items() if k != "rope_theta"}
                                             if rope.get("rope_type", "default") != "default" else None)
    return base, scaling


def write_gguf(folder: str | Path, out: str | Path, kind: str = "f16", name: str | None = None) -> dict:
    """`folder` as a GGUF file at `out` with weights in `kind`, written under a temporary name and
    renamed. Returns what was written."""
    import tempfile

    from mlxft.models.gguf import runtime

    folder, out = Path(folder), Path(out)
    if kind not in TYPES:
        raise UserError(f"--type {kind}: expected one of {', '.join(TYPES)}")
    if kind not in WRITTEN:
        runtime.require(f"--type {kind} (made by llama.cpp's quantizer)")
        with tempfile.TemporaryDirectory(prefix=".mlxft-quantize-", dir=out.parent) as work:
            report = write_gguf(folder, Path(work) / "f16.gguf", "f16", name)
            staging = out.with_name(f".{out.name}.tmp")
            try:
                runtime.quantize(Path(work) / "f16.gguf", staging, kind)
                staging.replace(out)
            finally:
                staging.unlink(missing_ok=True)
        return {**report, "file": str(out), "type": kind, "bytes": out.stat().st_size}
    return _write(folder, out, kind, name)


def _write(folder: Path, out: Path, kind: str, name: str | None) -> dict:
    from safetensors.numpy import load_file

    import gguf

    config = json.loads((folder / "config.json").read_text())
    arch = architecture(config, str(folder))
    if "quantization" in config or "quantization_config" in config:
        raise UserError(f"model {folder} is quantized; export its full-precision (fused, de-quantized) folder")
    weights = {}
    for path in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(str(path)))

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.tmp")
    writer = gguf.GGUFWriter(str(staging), arch.gguf)
    writer.add_name(name or folder.name)
    writer.add_file_type(FILE_TYPES[kind])
    add_hyperparameters(writer, config, arch, str(folder))
    vocabulary = add_tokenizer(writer, folder, config)

    target = gguf.GGMLQuantizationType[WRITTEN[kind]]
    written = 0
    for hf, array in weights.items():
        name_ = gguf_name(hf, arch)
        if name_ is None:
            raise UserError(f"model {folder}: tensor '{hf}' has no GGUF name (an architecture this export does not know)")
        array = as_written(hf, np.asarray(array, dtype=np.float32), arch, config)
        if array.ndim == 1 or target == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name_, np.ascontiguousarray(array))
        elif target == gguf.GGMLQuantizationType.F16:
            writer.add_tensor(name_, array.astype(np.float16))
        else:
            writer.add_tensor(name_, gguf.quants.quantize(array, target), raw_dtype=target)
        written += 1
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        staging.replace(out)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    return {"file": str(out), "architecture": arch.gguf, "model_type": arch.model_type, "type": kind, "tensors": written,
            "bytes": out.stat().st_size, "tokenizer": vocabulary}


def add_hyperparameters(writer, config: dict, arch, where: str) -> None:
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(int(head_dim * config.get("partial_rotary_factor", 1.0)))
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    base, scaling = rope_settings(config)
    writer.add_rope_freq_base(base)
    if scaling:
        kind_of_scaling = scaling.get("rope_type", scaling.get("type"))
        if kind_of_scaling not in ("linear", "yarn"):
            raise UserError(f"model {where}: rope scaling '{kind_of_scaling}' has no GGUF form here yet")
        writer.add_rope_scaling_type(kind_of_scaling)
        writer.add_rope_scaling_factor(float(scaling.get("factor", 1.0)))
    writer.add_vocab_size(config["vocab_size"])
    if arch.model_type in ("gemma2", "gemma3_text"):
        if config.get("sliding_window"):
            writer.add_sliding_window(int(config["sliding_window"]))
        if arch.model_type == "gemma2":
            writer.add_attn_logit_softcapping(float(config.get("attn_logit_softcapping") or 0.0))
            writer.add_final_logit_softcapping(float(config.get("final_logit_softcapping") or 0.0))
    if arch.model_type == "phi3" and config.get("sliding_window"):
        writer.add_sliding_window(int(config["sliding_window"]))
