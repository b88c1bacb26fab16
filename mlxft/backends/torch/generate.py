"""Text generation on PyTorch through transformers, from the same prompt ids the model was trained on."""

from __future__ import annotations

import torch

from mlxft.data.encode import encode_prompt


@torch.no_grad()
def generate_answer(model, tokenizer, prompt: str, *, max_tokens: int = 64, temperature: float = 0.0,
                    top_p: float = 0.0, top_k: int = 0) -> str:
    """The model's answer to a rendered prompt; greedy by default, as on MLX."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ids = torch.tensor([encode_prompt(tokenizer, prompt)], device=device)  # BOS exactly as in training
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p or 1.0, "top_k": top_k or 0} \
        if temperature > 0 else {"do_sample": False}
    output = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id, **sampling)
    if was_training:
        model.train()
    return tokenizer.decode(output[0, ids.shape[1]:].tolist(), skip_special_tokens=True)
