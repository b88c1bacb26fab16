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


@torch.no_grad()
def sample_completions(model, prompt_ids: list[int], n: int, *, max_tokens: int, temperature: float = 1.0,
                       top_p: float = 1.0, stop: set[int] = frozenset()) -> list[list[int]]:
    """n completions of one prompt, sampled together (temperature 0: greedy), as on MLX: the prompt
    runs once and its KV cache is repeated for the n rows. Each completion ends with its first stop
    token, or after max_tokens. Randomness is torch's global generator (seeded by the caller)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    output = model(input_ids=torch.tensor([prompt_ids], device=device), use_cache=True)
    cache = output.past_key_values
    cache.batch_repeat_interleave(n)
    logits = output.logits[:, -1, :].float().repeat(n, 1)
    stop_ids = torch.tensor(sorted(stop), device=device)
    tokens, done = [], torch.zeros(n, dtype=torch.bool, device=device)
    for _ in range(max_tokens):
        token = sample_token(logits, temperature, top_p)
        tokens.append(token)
        done |= torch.isin(token, stop_ids)
        if bool(done.all()):
            break
        logits = model(input_ids=token[:, None], past_key_values=cache, use_cache=True).logits[:, -1, :].float()
    model.train(was_training)
    completions = []
    for row in torch.stack(tokens, dim=1).tolist():
        end = next((k + 1 for k, t in enumerate(row) if t in stop), len(row))
        completions.append(row[:end])
    return completions


def sample_token(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """One token per row: the argmax at temperature 0, else a draw from softmax(logits / T) kept to
    the smallest set of tokens whose probability reaches top_p (nucleus sampling)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # tokens after the nucleus is full
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1)[:, 0]
