"""Load a model for training or evaluation on MLX, through mlx-lm's loader.

The folder comes from mlxft.models.files (built-in, local or hub), so the PyTorch backend reads
the very same files. A quantized MLX model (mlx-community 4-bit) loads as it is; `quantize`
quantizes a full-precision one on load. Either way LoRA on top of it is QLoRA.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from mlxft.errors import UserError
from mlxft.models.files import SPLIT_HEAD_TYPES, check_model_folder, mlx_config_overrides, model_type, resolve_model_dir
from mlxft.train import memory
from mlxft.train.driver import MemoryMeter


def load(name: str, *, quantize: int | None = None, trust_remote_code: bool = False):
    """(model, tokenizer, folder) for a model name; one-line errors for what users get wrong."""
    from mlx_lm.utils import load as mlx_lm_load
    from mlx_lm.utils import quantize_model

    folder = resolve_model_dir(name)
    check_model_folder(folder)
    try:
        model, tokenizer, config = mlx_lm_load(str(folder), return_config=True, trust_remote_code=trust_remote_code,
                                               model_config=mlx_config_overrides(json.loads((folder / "config.json").read_text())))
    except ValueError as e:
        raise UserError(f"model {folder}: mlx-lm cannot load it ({str(e).splitlines()[0]})") from None
    if quantize:
        if quantize not in (4, 8):
            raise UserError(f"--quantize takes 4 or 8, not {quantize}")
        if "quantization" in config:
            raise UserError(f"model {folder} is already quantized; drop --quantize")
        model, _ = quantize_model(model, config, group_size=64, bits=quantize)
    return model, tokenizer, folder


def logits_at(model, inputs: mx.array, positions: mx.array, split_head: bool) -> mx.array:
    """Logits [B, K, V] for the outputs at `positions` [B, K] only."""
    if not split_head:
        return mx.take_along_axis(model(inputs), positions[..., None], axis=1)
    return head_logits(model, hidden_at(model, inputs, positions))


def hidden_at(model, inputs: mx.array, positions: mx.array) -> mx.array:
    """The last hidden states [B, K, H] at `positions` [B, K] (a split-head model only)."""
    return mx.take_along_axis(model.model(inputs), positions[..., None], axis=1)


def head_logits(model, hidden: mx.array) -> mx.array:
    """The LM head on hidden states (tied to the embedding where the model ties them)."""
    if getattr(model, "lm_head", None) is not None and not model.args.tie_word_embeddings:
        return model.lm_head(hidden)
    return model.model.embed_tokens.as_linear(hidden)


def head_module(model):
    """The module whose weight the LM head multiplies by: lm_head, or the tied embedding."""
    if getattr(model, "lm_head", None) is not None and not model.args.tie_word_embeddings:
        return model.lm_head
    return model.model.embed_tokens


def head_trains(model) -> bool:
    """Whether the LM head has trainable weights (full fine-tuning, or LoRA on lm_head)."""
    return bool(tree_flatten(head_module(model).trainable_parameters()))


def token_scores(model, hidden: mx.array, tokens: mx.array, chunk: int, *, grad: bool = True, extras: bool = False):
    """Per scored token: (log-prob of `tokens` [...], and with `extras` the mean logit over the
    vocabulary and the entropy, both without gradient), from the last hidden states [..., H] that
    score them. The LM head runs on `chunk` positions at a time (0: all at once), one chunk after
    the other, and never holds [positions, vocabulary] logits for all of them.

    With a frozen head (LoRA, QLoRA) each chunk makes the gradient of its log-probs with respect
    to its hidden states while its logits are alive ([chunk, H], as the backward pass would), so
    the backward pass needs no logits at all and nothing is computed twice; `grad=False` (a
    reference or an evaluation) skips it. A trainable head keeps the whole logits, as before."""
    shape, width = tokens.shape, hidden.shape[-1]
    hidden, tokens = hidden.reshape(-1, width), mx.stop_gradient(tokens.reshape(-1))
    rows = hidden.shape[0]
    chunk = rows if chunk <= 0 else min(chunk, rows)

    def head(x):
        return head_logits(model, x).astype(mx.float32)

    module = head_module(model)
    plain = type(module) in (nn.Linear, nn.Embedding) and "bias" not in module
    weight = module.weight if plain else None

    def scores(x, t, with_gradient: bool):
        z = head(x)
        lse = mx.logsumexp(z, axis=-1, keepdims=True)
        at = t[:, None]
        out = [mx.take_along_axis(z, at, axis=-1)[:, 0] - lse[:, 0]]
        if with_gradient or extras:
            p = mx.exp(z - lse)
        if extras:
            out += [mx.stop_gradient(z.mean(-1)), mx.stop_gradient(lse[:, 0] - (p * z).sum(-1))]
        if with_gradient:  # d log p(t) / dz = onehot(t) - p, taken back through the head
            if weight is not None:  # W[t] - p W: no [chunk, V] one-hot, one array fewer alive
                g = (weight[t] - p.astype(weight.dtype) @ weight).astype(mx.float32)
            else:  # a quantized head: its own backward pass
                minus = mx.put_along_axis(p, at, mx.take_along_axis(p, at, axis=-1) - 1, axis=-1)
                g = -mx.vjp(head, [x], [minus])[1][0]  # negated at [chunk, H], not [chunk, V]
            out[0] = mx.depends(out[0], g)  # made now, while z is alive, not in the backward pass
            out.append(g)
        return out

    @mx.custom_function
    def piece(x, t):
        return scores(x, t, True)

    @piece.vjp
    def piece_vjp(primals, cotangents, outputs):
        return (cotangents[0][:, None] * outputs[-1]).astype(primals[0].dtype), mx.zeros_like(primals[1])

    if head_trains(model):  # the head's own gradient needs all of its logits: as before
        out = scores(hidden, tokens, False)
    else:
        pieces = []
        for i in range(0, rows, chunk):
            x = hidden[i : i + chunk]
            if pieces:  # one chunk after the other: else MLX may run them side by side, all logits alive
                x = mx.depends(x, pieces[-1][0])
            pieces.append(piece(x, tokens[i : i + chunk]) if grad else scores(x, tokens[i : i + chunk], False))
        out = [mx.concatenate([p[k] for p in pieces]) for k in range(3 if extras else 1)]
    out = [o.reshape(shape) for o in out[: 3 if extras else 1]]
    return tuple(out) if extras else out[0]


def can_split_head(model, folder: Path) -> bool:
    return model_type(folder) in SPLIT_HEAD_TYPES and hasattr(model, "model") and hasattr(model, "args")


def takes_block_mask(model, folder: Path) -> bool:
    """Whether this model can run rows with a mask of mlxft's own (shared prompts, packing): a
    family whose mlx-lm class asks the first layer's cache for the mask and rotates queries and
    keys with `self_attn.rope`, without sliding-window layers (the mask handed over has no window)."""
    if not can_split_head(model, folder) or not all(hasattr(layer, "self_attn") and hasattr(layer.self_attn, "rope")
                                                    for layer in model.model.layers):
        return False
    return all(t == "full_attention" for t in getattr(model.args, "layer_types", None) or [])


def can_share_prompts(model, folder: Path) -> bool:
    """Whether DPO may run each prompt once (mlxft.data.shared_prompt) on this model."""
    # mlx-lm's gradient checkpointing recomputes each block in the backward pass, after the
    # forward has put the rotary embeddings back; it patches the block class, so it holds for
    # every model of that class in the process once any run turned it on.
    if not takes_block_mask(model, folder):  # first: a model may keep its blocks elsewhere than model.model.layers
        return False
    return getattr(type(model.model.layers[0]).__call__, "__name__", "") != "checkpointed_fn"


def can_pack(model, folder: Path) -> bool:
    """Whether SFT may pack rows (mlxft.data.packing) on this model: its mask taken as given, and
    rotary positions, under which an example placed later in a row attends as it would at 0."""
    return takes_block_mask(model, folder)


def block_masked_hidden_at(model, inputs: mx.array, mask: mx.array, positions: mx.array) -> mx.array:
    """Last hidden states [B, K, H] at `positions` [B, K] of rows run with `mask` [B, 1, T, T] (True: may attend)."""
    hidden = model.model(inputs, cache=[_MaskOnly(mask)] * len(model.model.layers))
    return mx.take_along_axis(hidden, positions[..., None], axis=1)


def shared_prompt_hidden(model, prompt_ids: mx.array, answer_ids: mx.array, mask: mx.array) -> mx.array:
    """Last hidden states [2B, A, H] predicting answer_ids [2B, A] from one [prompt | chosen |
    rejected] row per pair (see mlxft.data.shared_prompt). The widths come from the arguments'
    shapes, so a compiled caller is traced again for every (P, A), never reused across them."""
    b, p = prompt_ids.shape
    a = answer_ids.shape[1]
    rows = mx.concatenate([prompt_ids, answer_ids[:b], answer_ids[b:]], axis=1)
    with _positions_restart(model, at=p + a, to=p):
        hidden = model.model(rows, cache=[_MaskOnly(mask)] * len(model.model.layers))
    chosen = hidden[:, p - 1 : p + a - 1]
    rejected = mx.concatenate([hidden[:, p - 1 : p], hidden[:, p + a : p + 2 * a - 1]], axis=1)
    return mx.concatenate([chosen, rejected], axis=0)


class _MaskOnly:
    """Not a cache: mlx-lm's models ask the first layer's cache for the attention mask, so this
    hands them the shared-prompt mask, and passes keys and values through unchanged."""

    offset = 0

    def __init__(self, mask: mx.array):
        self.mask = mask

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None) -> mx.array:
        return self.mask

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        return keys, values


class _RestartedRoPE:
    """A layer's own rotary embedding, with the positions from index `at` on restarting at `to`:
    the rejected answer sits where the chosen one does. mlx-lm's rotary classes take one offset
    for the whole sequence, so the two spans are rotated apart."""

    def __init__(self, rope, at: int, to: int):
        self.rope, self.at, self.to = rope, at, to

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        return mx.concatenate([self.rope(x[..., : self.at, :], offset=offset),
                               self.rope(x[..., self.at :, :], offset=offset + self.to)], axis=-2)


@contextmanager
def _positions_restart(model, *, at: int, to: int):
    """Every attention layer with _RestartedRoPE for the length of one forward (inside mx.compile:
    for the length of the trace, which is when the attribute is read)."""
    attentions = [layer.self_attn for layer in model.model.layers]
    ropes = [attention.rope for attention in attentions]
    for attention, rope in zip(attentions, ropes):
        attention.rope = _RestartedRoPE(rope, at, to)
    try:
        yield
    finally:
        for attention, rope in zip(attentions, ropes):
            attention.rope = rope


def scores_at(model, inputs, positions, tokens, split_head: bool, chunk: int | None = None, **kwargs):
    """token_scores of `tokens` [B, K] at `positions` [B, K] of `inputs`, the head in chunks of
    train.head_chunk (`chunk`); a model whose head cannot be split scores all of its logits."""
    if not split_head:
        return logits_scores(logits_at(model, inputs, positions, False), tokens, kwargs.get("extras", False))
    return hidden_scores(model, hidden_at(model, inputs, positions), tokens, chunk, **kwargs)


def hidden_scores(model, hidden, tokens, chunk: int | None = None, **kwargs):
    """token_scores with train.head_chunk's `chunk` (None: sized by the vocabulary)."""
    return token_scores(model, hidden, tokens, memory.head_chunk_rows(chunk, model.args.vocab_size), **kwargs)


def logits_scores(logits, tokens, extras: bool = False):
    """What token_scores returns, from logits already made."""
    logits = logits.astype(mx.float32)
    logps = -nn.losses.cross_entropy(logits, tokens)
    if not extras:
        return logps
    entropy = mx.logsumexp(logits, axis=-1) - (mx.softmax(logits, axis=-1) * logits).sum(-1)
    return logps, mx.stop_gradient(logits.mean(-1)), mx.stop_gradient(entropy)


def token_losses(model, inputs, positions, tokens, weights, split_head: bool,
                 chunk: int | None = None) -> tuple[mx.array, mx.array]:
    """(sum of token cross-entropies, number of scored tokens) for one micro-batch."""
    losses = -scores_at(model, inputs, positions, tokens, split_head, chunk) * weights
    return losses.sum(), weights.sum()


def is_quantized(model) -> bool:
    return any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())


def enable_gradient_checkpointing(model, lora_dropout: float) -> None:
    """Recompute each block's activations in the backward pass instead of keeping them (mlx-lm's
    grad_checkpoint patches the block class)."""
    from mlx_lm.tuner.trainer import grad_checkpoint

    if lora_dropout:
        # The backward pass recomputes each block's forward and would draw a second dropout mask,
        # unrelated to the one the loss saw: the gradients would be silently wrong.
        raise UserError("train.grad_checkpoint needs lora.dropout=0: the recomputed forward pass would draw another dropout mask")
    grad_checkpoint(model.layers[0])


def configure_memory() -> None:
    """On Metal, what mlx-lm does for unified memory: wire the recommended working set so
    weights are not paged out mid-step. Nothing to do on the CPU backend."""
    if not mx.metal.is_available():
        return
    info = mx.device_info()
    limit = info.get("max_recommended_working_set_size")
    if limit:
        mx.set_wired_limit(limit)


CACHE_LIMIT_FRACTION = 0.25  # of the recommended working set


def trim_cache() -> None:
    """On Metal, give cached buffers back once the cache outgrows a share of the working set,
    as mlx-lm's trainer does: with unified memory they are memory the system cannot use."""
    if not mx.metal.is_available():
        return
    limit = mx.device_info().get("max_recommended_working_set_size", 0) * CACHE_LIMIT_FRACTION
    if limit and mx.get_cache_memory() > limit:
        mx.clear_cache()


def peak_memory_gb() -> float:
    return mx.get_peak_memory() / 1e9


def memory_details() -> dict:
    """What MLX holds now: arrays in use, and freed buffers it keeps for reuse (the OS counts both)."""
    return {"active_memory_gb": mx.get_active_memory() / 1e9, "cache_memory_gb": mx.get_cache_memory() / 1e9}


def memory_budget() -> tuple[float | None, str]:
    """(GB, what it is) that train.memory_limit is a share of: on Metal the GPU's recommended
    working set (past it, unified memory swaps), on the CPU the machine's memory."""
    if mx.metal.is_available():
        size = mx.device_info().get("max_recommended_working_set_size")
        if size:
            return size / 1e9, "this Mac's recommended GPU working set"
    return memory.machine_memory_gb(), "this machine's memory"


def memory_meter() -> MemoryMeter:
    return MemoryMeter(peak_memory_gb, mx.reset_peak_memory, memory_budget, memory_details)
