"""GGUF files (llama.cpp, Ollama) as Hugging Face model folders, and back.

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

GGUF_VERSION = "1"  # of this converter: part of the cache key

# GGUF tensor name (per block "blk.{i}.") -> transformers name (per layer "model.layers.{i}.").
GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
ARCHITECTURES = {  # GGUF general.architecture -> (model_type, class, llama.cpp reorders q/k rows)
    "llama": ("llama", "LlamaForCausalLM", True),
    "qwen2": ("qwen2", "Qwen2ForCausalLM", False),
}


def hf_name(gguf_name: str) -> str | None:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'; None for what has no
    counterpart (llama.cpp's precomputed rope_freqs)."""
    stem, _, suffix = gguf_name.rpartition(".")
    if stem in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{BLOCK_NAMES[parts[2]]}.{suffix}"
    return None


def gguf_name(hf: str) -> str | None:
    """The inverse of hf_name."""
    stem, _, suffix = hf.rpartition(".")
    for short, long in GLOBAL_NAMES.items():
        if stem == long:
            return f"{short}.{suffix}"
    parts = stem.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"]:
        short = {v: k for k, v in BLOCK_NAMES.items()}.get(parts[3])
        if short:
            return f"blk.{parts[2]}.{short}.{suffix}"
    return None


def unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of query/key rows (it interleaves each head's two rotary halves)."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's reordering, for writing a GGUF file: the inverse of unpermute."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def read_config(reader) -> dict:
    """config.json for the model in a GGUF file, from its metadata."""
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise UserError(f"GGUF architecture '{arch}' is not supported yet (supported: {', '.join(ARCHITECTURES)})")
    model_type, cls, _ = ARCHITECTURES[arch]
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
    reorders = ARCHITECTURES[arch][2]
    weights = {}
    for tensor in reader.tensors:
        if progress:
            progress.update()
        name = hf_name(tensor.name)
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
    from mlxft.cache import build_once, cache_root

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
    import gguf
    from safetensors.numpy import save_file

    from mlxft.progress import Progress

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



# --- writing ------------------------------------------------------------------------------------

TYPES = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}
FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7}  # llama.cpp's LLAMA_FTYPE numbers


def write_gguf(folder: str | Path, out: str | Path, kind: str = "f16", name: str | None = None) -> dict:
    """A Hugging Face folder (llama or qwen2, full precision) -> one GGUF file llama.cpp, Ollama
    and transformers read: weights in `kind` (f32, f16 or q8_0; norms and biases stay f32, as
    llama.cpp keeps them), the tokenizer and chat template in the metadata. Written under a
    temporary name and renamed. Returns what was written."""
    import gguf
    from safetensors.numpy import load_file

    folder, out = Path(folder), Path(out)
    if kind not in TYPES:
        raise UserError(f"--type {kind}: expected one of {', '.join(TYPES)}")
    config = json.loads((folder / "config.json").read_text())
    arch = next((a for a, (model_type, _, _) in ARCHITECTURES.items() if model_type == config.get("model_type")), None)
    if arch is None:
        raise UserError(f"model {folder}: GGUF export supports {', '.join(ARCHITECTURES)} models, not "
                        f"'{config.get('model_type')}'")
    if "quantization" in config or "quantization_config" in config:
        raise UserError(f"model {folder} is quantized; export its full-precision (fused, de-quantized) folder")
    weights = {}
    for path in sorted(folder.glob("*.safetensors")):
        weights.update(load_file(str(path)))
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    reorders = ARCHITECTURES[arch][2]
    hidden = config["hidden_size"]

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.tmp")
    writer = gguf.GGUFWriter(str(staging), arch)
    writer.add_name(name or folder.name)
    writer.add_file_type(FILE_TYPES[kind])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(config.get("head_dim") or hidden // heads)
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    rope = config.get("rope_parameters") if isinstance(config.get("rope_parameters"), dict) else {}
    writer.add_rope_freq_base(float(config.get("rope_theta", rope.get("rope_theta", 10000.0))))
    scaling = config.get("rope_scaling") or ({k: v for k, v in rope.items() if k != "rope_theta"}
                                             if rope.get("rope_type", "default") != "default" else None)
    if scaling:
        kind_of_scaling = scaling.get("rope_type", scaling.get("type"))
        if kind_of_scaling not in ("linear", "yarn"):
            raise UserError(f"model {folder}: rope scaling '{kind_of_scaling}' has no GGUF form here yet")
        writer.add_rope_scaling_type(kind_of_scaling)
        writer.add_rope_scaling_factor(float(scaling.get("factor", 1.0)))
    writer.add_vocab_size(config["vocab_size"])
    _add_tokenizer(writer, folder, config)

    target = gguf.GGMLQuantizationType[TYPES[kind]]
    written = 0
    for hf, array in weights.items():
        name_ = gguf_name(hf)
        if name_ is None:
            raise UserError(f"model {folder}: tensor '{hf}' has no GGUF name (an architecture this export does not know)")
        array = np.asarray(array, dtype=np.float32)
        if reorders and hf.endswith("q_proj.weight"):
            array = permute(array, heads)
        elif reorders and hf.endswith("k_proj.weight"):
            array = permute(array, kv_heads)
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
    return {"file": str(out), "architecture": arch, "type": kind, "tensors": written, "bytes": out.stat().st_size}


def _add_tokenizer(writer, folder: Path, config: dict) -> None:
    """The tokenizer as llama.cpp describes it: a sentencepiece model ('llama': pieces, scores,
    types) or a byte-level BPE ('gpt2': tokens, types, merges), with the special ids and the chat
    template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if (folder / "tokenizer.model").exists():
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
        pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
        scores = [sp.get_score(i) for i in range(sp.get_piece_size())]
        types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 5 if sp.is_unused(i) else 1
                 for i in range(sp.get_piece_size())]
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(pieces)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
    else:
        state = json.loads((folder / "tokenizer.json").read_text())
        model = state.get("model", {})
        if model.get("type") != "BPE":
            raise UserError(f"model {folder}: its tokenizer ({model.get('type')}) has no GGUF form here yet")
        vocab = tokenizer.get_vocab()
        tokens = [None] * max(len(vocab), config["vocab_size"])
        for token, i in vocab.items():
            tokens[i] = token
        special = {t["content"] for t in state.get("added_tokens", []) if t.get("special")}
        types = [4 if t is None else 3 if t in special else 1 for t in tokens]
        tokens = [f"[PAD{i}]" if t is None else t for i, t in enumerate(tokens)]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
    for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                     ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        value = getattr(tokenizer, key, None)
        if value is not None:
            add(int(value))
    # Whether encoding adds BOS lives in a post-processor in transformers 5: ask the tokenizer.
    bos = tokenizer.bos_token_id
    writer.add_add_bos_token(bos is not None and tokenizer.encode("a")[:1] == [bos])
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
