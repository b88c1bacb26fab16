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
