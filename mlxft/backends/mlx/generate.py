"""Text generation on MLX through mlx-lm, from the same prompt ids the model was trained on."""

from __future__ import annotations

from mlxft.data.encode import encode_prompt


def generate_answer(model, tokenizer, prompt: str, *, max_tokens: int = 64, temperature: float = 0.0,
                    top_p: float = 0.0, top_k: int = 0) -> str:
    """The model's answer to a rendered prompt; greedy by default."""
    from mlx_lm import generate
    from mlx_lm.sample_utils import make_sampler

    was_training = model.training
    model.eval()
    ids = encode_prompt(tokenizer, prompt)  # BOS exactly as in training
    text = generate(model, tokenizer, ids, max_tokens=max_tokens,
                    sampler=make_sampler(temp=temperature, top_p=top_p, top_k=top_k))
    if was_training:
        model.train()
    return text


def sample_completions(model, prompt_ids: list[int], n: int, *, max_tokens: int, temperature: float = 1.0,
                       top_p: float = 1.0, stop: set[int] = frozenset()) -> list[list[int]]:
    """n completions of one prompt, sampled together (temperature 0: greedy): the prompt runs once
    and its KV cache is copied to the n rows. Each completion ends with its first stop token, or
    after max_tokens. Randomness is MLX's global generator (seeded by the caller)."""
    import mlx.core as mx
    import numpy as np
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.sample_utils import make_sampler

    was_training = model.training
    model.eval()
    sampler = make_sampler(temp=temperature, top_p=top_p if top_p < 1 else 0.0)
    cache = make_prompt_cache(model)
    logits = model(mx.array(prompt_ids)[None], cache=cache)[:, -1, :]
    for layer in cache:  # one prompt, n rows: the same keys and values for each
        keys, values = layer.keys[..., : layer.offset, :], layer.values[..., : layer.offset, :]
        layer.state = (mx.repeat(keys, n, axis=0), mx.repeat(values, n, axis=0), layer.offset)
    logits = mx.repeat(logits, n, axis=0)
    tokens, done = [], np.zeros(n, dtype=bool)
    stop_array = np.array(sorted(stop))
    for _ in range(max_tokens):
        logits = logits.astype(mx.float32)
        token = sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
        step = np.array(token)
        tokens.append(step)
        done |= np.isin(step, stop_array)
        if done.all():
            break
        logits = model(token[:, None], cache=cache)[:, -1, :]
    model.train(was_training)
    completions = []
    for row in np.stack(tokens, axis=1).tolist():
        end = next((k + 1 for k, t in enumerate(row) if t in stop), len(row))
        completions.append(row[:end])
    return completions
