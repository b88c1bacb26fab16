"""A PEFT LoRA adapter as llama.cpp's LoRA GGUF, for `llama-cli --lora`, `llama-server --lora` and
Ollama's ADAPTER, written here with no llama.cpp checkout or script.

The file holds `general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha`, and per adapted
linear `<base tensor>.lora_a` [r, in] and `.lora_b` [out, r], named after the base's GGUF tensors.
llama.cpp scales by alpha / r, so an rsLoRA adapter (alpha / sqrt(r)) is written with alpha x sqrt(r).
B's rows are the output rows, so they take the base's query/key reordering. DoRA magnitudes and
whole modules (modules_to_save: a reward head) have no place in that format: refused, pointing to fuse.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mlxft.errors import UserError
from mlxft.models.gguf.names import architecture, as_written, gguf_name


def llama_cpp_alpha(spec) -> float:
    """The alpha llama.cpp must read for its alpha / r to equal the adapter's scaling."""
    return float(spec.scaling * spec.r)


def write_adapter_gguf(adapter: str | Path, base_folder: str | Path, out: str | Path) -> dict:
    import gguf
    from mlxft.models.adapters import CONFIG_FILE, AdapterSpec, adapter_folder, load_adapter

    where = adapter_folder(adapter)
    spec = AdapterSpec.from_peft(json.loads((where / CONFIG_FILE).read_text()), str(where))
    if spec.use_dora:
        raise UserError(f"adapter {where} is DoRA: llama.cpp's LoRA GGUF has no magnitudes; "
                        f"fuse it (mlxft export gguf {adapter} --out FILE.gguf) instead of --adapter-only")
    if spec.modules_to_save:
        raise UserError(f"adapter {where} trains {', '.join(spec.modules_to_save)} in full, which llama.cpp's LoRA GGUF "
                        f"cannot hold; fuse it (mlxft fuse) instead of --adapter-only")
    _, weights = load_adapter(where)
    base_folder, out = Path(base_folder), Path(out)
    config = json.loads((base_folder / "config.json").read_text())
    arch = architecture(config, str(base_folder))
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.tmp")
    writer = gguf.GGUFWriter(str(staging), arch.gguf)
    writer.add_name(where.name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, llama_cpp_alpha(spec))
    for module, (a, b) in sorted(weights.items()):
        name = gguf_name(f"{module}.weight", arch)
        if name is None:
            raise UserError(f"adapter {where}: module '{module}' has no GGUF tensor in a {arch.model_type} model")
        writer.add_tensor(f"{name}.lora_a", np.ascontiguousarray(a, dtype=np.float32))
        writer.add_tensor(f"{name}.lora_b", np.ascontiguousarray(as_written(module, np.asarray(b, np.float32), arch, config)))
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        staging.replace(out)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    return {"file": str(out), "architecture": arch.gguf, "type": "lora", "tensors": 2 * len(weights), "r": spec.r,
            "alpha": llama_cpp_alpha(spec), "bytes": out.stat().st_size}
