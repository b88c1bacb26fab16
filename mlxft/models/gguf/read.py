"""A GGUF file (llama.cpp, Ollama) as a Hugging Face model folder: what `--model FILE.gguf` and
`--model ollama:NAME` load.

    mlxft lora --recipe tallrec --model path/to/model.gguf
    mlxft lora --recipe tallrec --model ollama:smollm2:135m

A GGUF file is read with the `gguf` package (numpy): every tensor de-quantized to float32, named
as transformers names it, and llama.cpp's reordering of the query and key rows undone; config.json
comes from the file's metadata and the tokenizer (with its chat template) from transformers' own
GGUF reader. The folder is written once into the cache (MLXFT_HOME/gguf-<hash>) and both backends
load it like any other.

Supported: the llama family (Llama, Mistral, SmolLM) and qwen2; any quantization type the `gguf`
package de-quantizes. Raises UserError naming an unsupported architecture or type.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from mlxft.errors import UserError
from mlxft.models.gguf.names import READABLE, hf_name, unpermute

GGUF_VERSION = "1"  # of this converter: part of the cache key


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def read_config(reader) -> dict:
    """config.json for the model in a GGUF file, from its metadata."""
    arch = _field(reader, "general.architecture")
    if arch not in READABLE:
        raise UserError(f"GGUF architecture '{arch}' is not supported yet (supported: {', '.join(READABLE)})")
    model_type, cls = READABLE[arch].model_type, READABLE[arch].cls
    def get(key, default=None):
        return _field(reader, f"{arch}.{key}", default)

    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    names = {t.name for t in reader.tensors}
    embedding = next(t for t in reader.tensors if t.name == "token_embd.weight")
    config = {
        "architectures": [cls], "model_type": model_type,
        "hidden_size": hidden, "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")), "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": int(get("attention.key_length", get("rope.dimension_count", hidden // heads))),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 2048)),
        "vocab_size": int(embedding.shape[-1]),
        "tie_word_embeddings": "output.weight" not in names,
        "hidden_act": "silu", "torch_dtype": "float32",
    }
    scaling = get("rope.scaling.type")
    if scaling and scaling != "none":
        config["rope_scaling"] = {"rope_type": scaling, "factor": float(get("rope.scaling.factor", 1.0))}
        if get("rope.scaling.original_context_length"):
            config["rope_scaling"]["original_max_position_embeddings"] = int(get("rope.scaling.original_context_length"))
    for key, name in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
        value = _field(reader, f"tokenizer.ggml.{name}")
        if value is not None:
            config[key] = int(value)
    if model_type == "qwen2":
        config["use_sliding_window"] = False
    return config


def read_weights(reader, config: dict, progress=None) -> dict[str, np.ndarray]:
    """Every tensor, de-quantized to float32 and named and laid out as transformers has it."""
    import gguf

    arch = _field(reader, "general.architecture")
    reorders = READABLE[arch].reorders_qk
    weights = {}
    for tensor in reader.tensors:
        if progress:
            progress.update()
        name = hf_name(tensor.name, READABLE[arch])
        if name is None:
            continue
        try:
            array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise UserError(f"GGUF tensor {tensor.name}: quantization type {tensor.tensor_type.name} cannot be "
                            "read yet (the gguf package does not de-quantize it)") from None
        array = np.asarray(array, dtype=np.float32).reshape([int(n) for n in reversed(tensor.shape)])
        if reorders and name.endswith("q_proj.weight"):
            array = unpermute(array, config["num_attention_heads"])
        elif reorders and name.endswith("k_proj.weight"):
            array = unpermute(array, config["num_key_value_heads"])
        weights[name] = np.ascontiguousarray(array)
    return weights


def cache_key(path: Path) -> str:
    """Names the converted folder: the file's size, its first and last MiB, and this converter.
    (Hashing all of a 5 GB file would take longer than reading it once more.)"""
    digest = hashlib.sha256(GGUF_VERSION.encode())
    size = path.stat().st_size
    digest.update(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(size - (1 << 20), 0))
        digest.update(f.read(1 << 20))
    return digest.hexdigest()[:16]


def gguf_folder(path: str | Path, echo=None) -> Path:
    """The Hugging Face folder of a GGUF file, converted into the cache on first use."""
    from mlxft.models.cache import build_once, cache_root

    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"model {path}: no such GGUF file")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise UserError(f"model {path}: not a GGUF file (it does not start with 'GGUF')")
    target = cache_root() / f"gguf-{cache_key(path)}"
    return build_once(target, "model.safetensors", lambda staging: convert(path, staging, echo))


def convert(path: Path, folder: Path, echo=None) -> None:
    """Write config.json, model.safetensors and the tokenizer of a GGUF file into `folder`."""
    from safetensors.numpy import save_file

    import gguf
    from mlxft.train.progress import Progress

    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError) as e:
        raise UserError(f"model {path}: cannot read it as GGUF ({str(e).splitlines()[0]})") from None
    config = read_config(reader)
    (echo or print)(f"converting {path.name} ({config['model_type']}, {config['num_hidden_layers']} layers) "
                    "into a Hugging Face folder, once")
    progress = Progress(len(reader.tensors), unit="tensor")
    weights = read_weights(reader, config, progress)
    progress.close()
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    _write_tokenizer(path, folder)


def _write_tokenizer(path: Path, folder: Path) -> None:
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except ImportError as e:
        raise UserError(f"model {path}: reading a GGUF file's tokenizer needs PyTorch for transformers' GGUF "
                        f"reader ({e}); install torch (on Linux: pip install torch==2.13.0)") from None
    except (ValueError, KeyError, OSError) as e:
        raise UserError(f"model {path}: transformers cannot read its tokenizer ({str(e).splitlines()[0]})") from None
    tokenizer.save_pretrained(str(folder))
