"""The built-in model: what every command uses when no --model is named, so mlxft runs offline.

A tiny Llama (0.7M parameters, 2,048-token BPE vocabulary, Hugging Face names) shipped in the
package, mlxft/models/builtin_model/ (~3 MB: mlxft's own weights and tokenizer, made by
mlxft.builtin_factory, which says how). On first use it is copied into the cache folder (MLXFT_HOME,
default ~/.cache/mlxft) under a name that hashes the shipped files, and both backends load it
from there through their usual loaders.

This module also writes random Llama folders next to a tokenizer (write_model): the tests and
benchmarks use them for models of other sizes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from functools import lru_cache
from pathlib import Path

from mlxft.models.cache import build_once, cache_root

PACKAGED = Path(__file__).parent / "builtin_model"


@lru_cache(maxsize=1)
def _digest() -> str:
    digest = hashlib.sha256()
    for path in sorted(PACKAGED.iterdir()):
        if path.is_file() and path.name != "README.md":
            digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:12]


def builtin_dir() -> Path:
    """The cache folder of the model, named by a hash of the shipped files."""
    return cache_root() / f"builtin-{_digest()}"


def ensure_builtin() -> Path:
    """The built-in model folder, copied from the package into the cache on first use."""

    def copy(staging: Path) -> None:
        for path in PACKAGED.iterdir():
            if path.is_file():
                shutil.copy(path, staging / path.name)

    return build_once(builtin_dir(), "model.safetensors", copy)


def tokenizer_dir() -> Path:
    """The built-in tokenizer's folder (the model's own)."""
    return ensure_builtin()


# Small enough to train in minutes on two CPU cores, large enough to learn the bundled tasks.
ARCHITECTURE = {
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 1024,
}
WEIGHTS_SEED = 0


def model_config(vocab_size: int, architecture: dict | None = None) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **(architecture or ARCHITECTURE),
        "vocab_size": vocab_size,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }


def initial_weights(config: dict, seed: int = WEIGHTS_SEED) -> dict:
    """GPT-2-style initialisation: normal(0, 0.02), residual outputs scaled by 1/sqrt(2 * layers)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    d, f, n = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    kv_dim = d // heads * kv
    std, out_std = 0.02, 0.02 / (2 * n) ** 0.5

    def normal(shape, scale=std):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    weights = {"model.embed_tokens.weight": normal((config["vocab_size"], d)),
               "model.norm.weight": np.ones(d, np.float32)}
    for i in range(n):
        p = f"model.layers.{i}."
        weights.update({
            p + "self_attn.q_proj.weight": normal((d, d)),
            p + "self_attn.k_proj.weight": normal((kv_dim, d)),
            p + "self_attn.v_proj.weight": normal((kv_dim, d)),
            p + "self_attn.o_proj.weight": normal((d, d), out_std),
            p + "mlp.gate_proj.weight": normal((f, d)),
            p + "mlp.up_proj.weight": normal((f, d)),
            p + "mlp.down_proj.weight": normal((d, f), out_std),
            p + "input_layernorm.weight": np.ones(d, np.float32),
            p + "post_attention_layernorm.weight": np.ones(d, np.float32),
        })
    return weights


def write_model(folder: Path, architecture: dict | None = None, seed: int = WEIGHTS_SEED) -> None:
    """config.json, model.safetensors and generation_config.json next to the tokenizer.
    Tests pass a smaller `architecture` to get a model that trains in a blink."""
    from safetensors.numpy import save_file
    from transformers import AutoTokenizer

    vocab_size = len(AutoTokenizer.from_pretrained(str(folder)))
    config = model_config(vocab_size, architecture)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    save_file(initial_weights(config, seed), str(folder / "model.safetensors"), metadata={"format": "pt"})
