"""Which transformers architectures have a GGUF form, and how their tensors are named and laid
out there (llama.cpp's names: token_embd, blk.N.attn_q, ...).

Each architecture differs from llama in a few named ways, so that a reader sees all of them here:
- `reorders_qk`: llama.cpp's llama graph wants each head's query/key rows interleaved (permute);
- `block_names`: per-block transformers leaf -> GGUF leaf; gemma2 and gemma3 have four norms where
  llama has two, and phi3 fuses q/k/v and gate/up;
- `norm_offset`: Gemma's RMSNorm multiplies by (1 + w); llama.cpp's graph by w, so +1 is stored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}

LLAMA_BLOCK = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
QK_NORMS = {"self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
GEMMA_NORMS = {  # gemma2/3: a norm after attention and one after the MLP, each before its residual add
    "input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
}


@dataclass(frozen=True)
class Architecture:
    gguf: str  # general.architecture in the file
    model_type: str  # config.json's
    cls: str  # config.json's architectures[0]
    block_names: dict = field(default_factory=lambda: dict(LLAMA_BLOCK))
    reorders_qk: bool = False
    norm_offset: float = 0.0
    readable: bool = False  # mlxft.models.gguf.read turns such a file back into a folder


ARCHITECTURES = {a.model_type: a for a in (
    Architecture("llama", "llama", "LlamaForCausalLM", reorders_qk=True, readable=True),
    Architecture("llama", "mistral", "MistralForCausalLM", reorders_qk=True),  # llama.cpp converts Mistral as llama
    Architecture("qwen2", "qwen2", "Qwen2ForCausalLM", readable=True),
    Architecture("qwen3", "qwen3", "Qwen3ForCausalLM", block_names={**LLAMA_BLOCK, **QK_NORMS}),
    Architecture("phi3", "phi3", "Phi3ForCausalLM", block_names={
        "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
        "self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output",
        "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}),
    Architecture("gemma2", "gemma2", "Gemma2ForCausalLM", norm_offset=1.0,
                 block_names={**LLAMA_BLOCK, **GEMMA_NORMS}),
    Architecture("gemma3", "gemma3_text", "Gemma3ForCausalLM", norm_offset=1.0,
                 block_names={**LLAMA_BLOCK, **GEMMA_NORMS, **QK_NORMS}),
)}
READABLE = {a.gguf: a for a in ARCHITECTURES.values() if a.readable}


def architecture(config: dict, where: str) -> Architecture:
    from mlxft.errors import UserError

    arch = ARCHITECTURES.get(config.get("model_type"))
    if arch is None:
        raise UserError(f"model {where}: GGUF export supports {', '.join(sorted(ARCHITECTURES))} models, not "
                        f"'{config.get('model_type')}'")
    return arch


def gguf_name(hf: str, arch: Architecture = ARCHITECTURES["llama"]) -> str | None:
    """'model.layers.3.self_attn.q_proj.weight' -> 'blk.3.attn_q.weight'; None for a tensor with
    no GGUF counterpart."""
    stem, _, suffix = hf.rpartition(".")
    if stem in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[stem]}.{suffix}"
    parts = stem.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in arch.block_names:
        return f"blk.{parts[2]}.{arch.block_names[parts[3]]}.{suffix}"
    return None


def hf_name(gguf: str, arch: Architecture = ARCHITECTURES["llama"]) -> str | None:
    """The inverse of gguf_name; None for what has no counterpart (llama.cpp's rope_freqs)."""
    stem, _, suffix = gguf.rpartition(".")
    for long, short in GLOBAL_NAMES.items():
        if stem == short:
            return f"{long}.{suffix}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk":
        long = {v: k for k, v in arch.block_names.items()}.get(parts[2])
        if long:
            return f"model.layers.{parts[1]}.{long}.{suffix}"
    return None


def unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of query/key rows (it interleaves each head's two rotary halves)."""
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's reordering, for writing a GGUF file: the inverse of unpermute."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def as_written(hf: str, array: np.ndarray, arch: Architecture, config: dict) -> np.ndarray:
    """A transformers tensor (or a LoRA B, whose rows are the output rows) laid out as llama.cpp reads it."""
    heads = config["num_attention_heads"]
    if arch.reorders_qk and ".q_proj." in f"{hf}.":
        return permute(array, heads)
    if arch.reorders_qk and ".k_proj." in f"{hf}.":
        return permute(array, config.get("num_key_value_heads") or heads)
    if arch.norm_offset and array.ndim == 1 and hf.endswith("norm.weight"):
        return array + arch.norm_offset
    return array
