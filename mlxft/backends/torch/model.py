"""Load a model for training or evaluation on PyTorch, through transformers.

The folder comes from mlxft.models.files (built-in, local or hub), exactly as on MLX, so both
backends read the same config.json, safetensors and tokenizer files and see the same token ids.
Weights stay float32; on CUDA the forward runs under bf16 autocast when the GPU supports it, the
usual mixed-precision recipe (master weights and optimizer state in float32).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from mlxft.errors import UserError
from mlxft.models.files import SPLIT_HEAD_TYPES, check_model_folder, load_tokenizer, model_type, resolve_model_dir
from mlxft.train import memory
from mlxft.train.driver import MemoryMeter


def pick_device() -> torch.device:
    """CUDA, then Apple's MPS, then the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def load(name: str, *, quantize: int | None = None, trust_remote_code: bool = False, device: torch.device | None = None):
    """(model, tokenizer, folder) for a model name; one-line errors for what users get wrong."""
    from transformers import AutoModelForCausalLM

    device = device or pick_device()
    folder = resolve_model_dir(name)
    check_model_folder(folder)
    config = json.loads((folder / "config.json").read_text())
    # mlx-lm writes "quantization" (and a copy as "quantization_config", without the
    # "quant_method" every transformers quantizer has).
    if "quantization" in config and "quant_method" not in (config.get("quantization_config") or {}):
        raise UserError(f"model {folder} is quantized in MLX's format; the PyTorch backend needs the "
                        "full-precision model (or use --backend mlx)")
    kwargs = {"dtype": torch.float32, "trust_remote_code": trust_remote_code}
    if quantize:
        kwargs["quantization_config"] = _bitsandbytes_config(quantize, config, folder, device)
        kwargs["device_map"] = {"": 0}
    try:
        with quiet_progress():
            model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    except (ValueError, OSError, KeyError) as e:
        raise UserError(f"model {folder}: transformers cannot load it ({str(e).splitlines()[0]})") from None
    if not is_quantized(model):  # a quantizer places its weights itself, and refuses .to()
        model.to(device)
    tokenizer = load_tokenizer(folder, trust_remote_code=trust_remote_code)
    return model, tokenizer, folder


@contextlib.contextmanager
def quiet_progress():
    """No "Loading weights" / "Writing model shards" bars: transformers 5 draws them on stderr for
    every local load and save, where mlx-lm draws none, and they would land amid mlxft's report
    lines (and in `mlxft eval auc --json` under click's test runner)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _bitsandbytes_config(bits: int, config: dict, folder: Path, device: torch.device):
    """QLoRA on PyTorch is bitsandbytes' NF4 (or int8), which only runs on NVIDIA GPUs."""
    if bits not in (4, 8):
        raise UserError(f"--quantize takes 4 or 8, not {bits}")
    if device.type != "cuda":
        raise UserError(f"--quantize (QLoRA) on the PyTorch backend needs CUDA (bitsandbytes); this host has "
                        f"{device.type}. Use --backend mlx, or drop --quantize")
    if "quantization_config" in config:
        raise UserError(f"model {folder} is already quantized; drop --quantize")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError('--quantize on the PyTorch backend needs bitsandbytes: pip install bitsandbytes') from None
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)


def is_quantized(model) -> bool:
    """Loaded through a transformers quantizer (bitsandbytes, GPTQ, AWQ, ...)."""
    return getattr(model, "hf_quantizer", None) is not None or bool(getattr(model, "is_quantized", False))


def can_split_head(model, folder: Path) -> bool:
    return (model_type(folder) in SPLIT_HEAD_TYPES and hasattr(model, "model") and hasattr(model, "lm_head")
            and not getattr(model.config, "final_logit_softcapping", None))


def takes_block_mask(model, folder: Path) -> bool:
    """Whether this model can run rows with a mask of mlxft's own (shared prompts, packing): a
    family whose head can be split off, attention that takes a custom 4D mask (sdpa, eager), and no
    sliding window (transformers would not apply it to a mask it is handed)."""
    config = model.config
    windowed = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    windowed = windowed or "sliding_attention" in (getattr(config, "layer_types", None) or [])
    return (can_split_head(model, folder) and getattr(config, "_attn_implementation", None) in ("sdpa", "eager")
            and not windowed)


can_share_prompts = takes_block_mask  # DPO running each prompt once (mlxft.data.shared_prompt)
can_pack = takes_block_mask  # SFT's packed rows (mlxft.data.packing)


def block_masked_hidden(model, rows: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Last hidden states [B, T, H] of rows run with `mask` [B, 1, T, T] (bool, True: may attend)
    and per-token `positions` ([1 or B, T]), which transformers takes as they are."""
    if model.config._attn_implementation == "eager":  # it adds the mask to the scores
        mask = torch.zeros(mask.shape, dtype=model.dtype, device=mask.device).masked_fill(~mask, torch.finfo(model.dtype).min)
    return model.model(input_ids=rows, attention_mask=mask, position_ids=positions, use_cache=False).last_hidden_state


def shared_prompt_hidden(model, prompt_ids: torch.Tensor, answer_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states [2B, A, H] predicting answer_ids [2B, A] from one [prompt | chosen |
    rejected] row per pair (see mlxft.data.shared_prompt): the rejected answer gets the chosen one's positions."""
    b, p = prompt_ids.shape
    a = answer_ids.shape[1]
    rows = torch.cat([prompt_ids, answer_ids[:b], answer_ids[b:]], dim=1)
    positions = torch.cat([torch.arange(p + a), torch.arange(p, p + a)]).to(rows.device)[None]
    hidden = block_masked_hidden(model, rows, mask, positions)
    chosen = hidden[:, p - 1 : p + a - 1]
    rejected = torch.cat([hidden[:, p - 1 : p], hidden[:, p + a : p + 2 * a - 1]], dim=1)
    return torch.cat([chosen, rejected])


def block_masked_hidden_at(model, inputs: torch.Tensor, mask: torch.Tensor, segment_positions: torch.Tensor,
                           positions: torch.Tensor) -> torch.Tensor:
    """Last hidden states [B, K, H] at `positions` [B, K] of packed rows (mlxft.data.packing)."""
    hidden = block_masked_hidden(model, inputs, mask, segment_positions)
    return hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))


def enable_gradient_checkpointing(model, lora_dropout: float = 0.0) -> None:
    """Recompute each block's activations in the backward pass instead of keeping them.

    Non-reentrant checkpointing, so gradients reach the LoRA layers although the embeddings are
    frozen. torch's checkpoint restores the RNG state before recomputing, so LoRA dropout draws
    the same mask again (MLX's trainer has to refuse that combination; this one need not, and so
    ignores `lora_dropout`, which it takes to share MLX's signature).
    transformers 5 renamed the method and keeps the old name as a deprecated alias."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def autocast(device: torch.device):
    """bf16 autocast on a CUDA GPU that has bf16; float32 everywhere else (CPU, MPS, older GPUs)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def logits_at(model, inputs: torch.Tensor, positions: torch.Tensor, split_head: bool) -> torch.Tensor:
    """Logits [B, K, V] for the outputs at `positions` [B, K] only. `model` is the transformers
    causal LM itself (PEFT injects its LoRA layers into it in place)."""
    if not split_head:
        logits = model(input_ids=inputs).logits
        return logits.gather(1, positions[..., None].expand(-1, -1, logits.shape[-1]))
    return model.lm_head(hidden_at(model, inputs, positions))  # tied embeddings: lm_head.weight is embed_tokens.weight


def hidden_at(model, inputs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The last hidden states [B, K, H] at `positions` [B, K] (a split-head model only)."""
    hidden = model.model(input_ids=inputs).last_hidden_state
    return hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))


def token_losses(model, inputs, positions, tokens, weights, split_head: bool,
                 chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token cross-entropies, number of scored tokens) for one micro-batch."""
    losses = -scores_at(model, inputs, positions, tokens.long(), split_head, chunk) * weights
    return losses.sum(), weights.sum()


def head_trains(model) -> bool:
    """Whether the LM head has trainable weights (full fine-tuning, or LoRA on lm_head)."""
    return any(p.requires_grad for p in model.lm_head.parameters())


def chunk_scores(hidden, tokens, weight, bias, extras: bool, with_gradient: bool):
    """One chunk's log-probs [c] (and mean logits, entropies), and with `with_gradient` the
    gradient of its log-probs with respect to its hidden states [c, H]; the [c, V] logits are
    worked on in place, one copy at a time."""
    z = F.linear(hidden, weight, bias).float()
    means = z.mean(-1) if extras else None
    z -= torch.logsumexp(z, dim=-1, keepdim=True)  # log p
    logps = z.gather(1, tokens[:, None])[:, 0]
    entropy = -(z.exp() * z).sum(-1) if extras else None
    if not with_gradient:
        return logps, means, entropy, None
    p = z.exp_()
    p.scatter_add_(1, tokens[:, None], torch.full_like(logps[:, None], -1.0))  # p - onehot(t)
    return logps, means, entropy, -(p.to(weight.dtype) @ weight)


class HeadScores(torch.autograd.Function):
    """token_scores's chunks under autograd: the gradient with respect to the hidden states is
    made in the forward, chunk by chunk, so the backward pass holds no logits (a frozen head)."""

    @staticmethod
    def forward(ctx, hidden, tokens, weight, bias, chunk: int, extras: bool):
        with_gradient = ctx.needs_input_grad[0]
        out = [chunk_scores(hidden[i : i + chunk], tokens[i : i + chunk], weight, bias, extras, with_gradient)
               for i in range(0, hidden.shape[0], chunk)]
        logps = torch.cat([o[0] for o in out])
        if with_gradient:
            ctx.save_for_backward(torch.cat([o[3] for o in out]))
        if not extras:
            return logps
        ctx.mark_non_differentiable(means := torch.cat([o[1] for o in out]), entropy := torch.cat([o[2] for o in out]))
        return logps, means, entropy

    @staticmethod
    def backward(ctx, grad_logps, *_):
        (g,) = ctx.saved_tensors
        return (grad_logps[:, None] * g).to(g.dtype), None, None, None, None, None


def token_scores(model, hidden, tokens, chunk: int | None = None, *, extras: bool = False):
    """Per scored token: the log-prob of `tokens` [...] (and with `extras` the mean logit and the
    entropy, detached), from the last hidden states [..., H] scoring them: the LM head on
    train.head_chunk positions at a time (mlxft.backends.mlx.model.token_scores). A trainable or
    non-linear head gets the whole logits, as before."""
    head, shape = model.lm_head, tokens.shape
    chunk = memory.head_chunk_rows(chunk, head.weight.shape[0])
    if chunk <= 0 or head_trains(model) or type(head) is not torch.nn.Linear:
        return logits_scores(head(hidden), tokens, extras)
    out = HeadScores.apply(hidden.reshape(-1, hidden.shape[-1]), tokens.reshape(-1), head.weight, head.bias, chunk,
                           extras)
    return tuple(o.view(shape) for o in out) if extras else out.view(shape)


def logits_scores(logits, tokens, extras: bool = False):
    """What token_scores returns, from logits already made."""
    logits = logits.float()
    logps = -F.cross_entropy(logits.flatten(0, -2), tokens.flatten(), reduction="none").view_as(tokens)
    if not extras:
        return logps
    detached = logits.detach()
    entropy = torch.logsumexp(detached, dim=-1) - (torch.softmax(detached, dim=-1) * detached).sum(-1)
    return logps, detached.mean(-1), entropy


def scores_at(model, inputs, positions, tokens, split_head: bool, chunk: int | None = None, *, extras: bool = False):
    """token_scores at `positions` [B, K] of `inputs`; a model whose head cannot be split scores all of its logits."""
    if not split_head:
        return logits_scores(logits_at(model, inputs, positions, False), tokens, extras)
    return token_scores(model, hidden_at(model, inputs, positions), tokens, chunk, extras=extras)


def to_device(device: torch.device, *arrays):
    """numpy batch arrays -> tensors on the device (ids as int64, which embedding and gather take;
    masks stay boolean)."""
    return [torch.from_numpy(a).to(device, torch.long if a.dtype.kind in "iu" else torch.bool if a.dtype.kind == "b"
                                   else torch.float32) for a in arrays]


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


_mps_peak = 0


def peak_memory_gb(device: torch.device) -> float:
    """The device allocator's peak. MPS keeps no peak, so it is the largest of the amounts seen at
    each report. On the CPU torch keeps none either: the process's peak resident size stands in
    (it also counts Python, the tokenizer and anything else in the process, and cannot be reset)."""
    global _mps_peak
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    if device.type == "mps":
        _mps_peak = max(_mps_peak, torch.mps.driver_allocated_memory())
        return _mps_peak / 1e9
    return memory.peak_rss_gb()


def memory_budget(device: torch.device) -> tuple[float | None, str]:
    """(GB, what it is) that train.memory_limit is a share of: the GPU's memory on CUDA, MPS's
    recommended working set on a Mac, else the machine's memory."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 1e9, "this GPU's memory"
    if device.type == "mps":
        return torch.mps.recommended_max_memory() / 1e9, "this Mac's recommended GPU working set"
    return memory.machine_memory_gb(), "this machine's memory"


def memory_details(device: torch.device) -> dict:
    """MLX's two figures under the same names, so that both backends' reports have the same keys:
    memory in live tensors, and what the allocator keeps for reuse. torch's CPU keeps neither (None)."""
    if device.type == "cuda":
        active, reserved = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
    elif device.type == "mps":
        active, reserved = torch.mps.current_allocated_memory(), torch.mps.driver_allocated_memory()
    else:
        return {"active_memory_gb": None, "cache_memory_gb": None}
    return {"active_memory_gb": active / 1e9, "cache_memory_gb": max(reserved - active, 0) / 1e9}


def memory_meter(device: torch.device) -> MemoryMeter:
    return MemoryMeter(lambda: peak_memory_gb(device), lambda: reset_peak_memory(device), lambda: memory_budget(device),
                       lambda: memory_details(device))
