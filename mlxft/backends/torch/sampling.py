"""Sampling on PyTorch as mlx-lm samples (its mlx_lm.sample_utils): one token from a row of
logits, for the one-request path (stream.py) and the running batch (batch.py) alike."""

from __future__ import annotations

import torch

from mlxft.generation import Sampling

REPETITION_CONTEXT = 20  # tokens the repetition penalty looks back on, as mlx-lm's default


def next_token(logits: torch.Tensor, history: list[int], sampling: Sampling, generator: torch.Generator | None = None) -> int:
    """One token from a row of logits [V] as mlx-lm samples it: repetition penalty over the recent
    tokens, then argmax at temperature 0, else top-p and top-k on the log-probabilities (at
    temperature 1) and a draw from what is left, divided by the temperature."""
    if sampling.repetition_penalty != 1.0 and history:
        logits = penalize_repetition(logits, history[-REPETITION_CONTEXT:], sampling.repetition_penalty)
    if sampling.temperature == 0:
        return int(logits.argmax())
    logprobs = torch.log_softmax(logits, dim=-1)
    if 0 < sampling.top_p < 1:
        logprobs = keep_top_p(logprobs, sampling.top_p)
    if 0 < sampling.top_k < logprobs.shape[-1]:  # top_k past the vocabulary keeps every token
        logprobs = keep_top_k(logprobs, sampling.top_k)
    probs = torch.softmax(logprobs / sampling.temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def penalize_repetition(logits: torch.Tensor, recent: list[int], penalty: float) -> torch.Tensor:
    """Each recent token's logit moved towards less likely: divided by the penalty when positive,
    multiplied when negative (CTRL's sign-aware penalty, as in mlx-lm and transformers)."""
    ids = torch.tensor(sorted(set(recent)), device=logits.device)
    selected = logits[ids]
    logits = logits.clone()
    logits[ids] = torch.where(selected < 0, selected * penalty, selected / penalty)
    return logits


def keep_top_p(logprobs: torch.Tensor, top_p: float) -> torch.Tensor:
    """The smallest set of likeliest tokens whose probability reaches top_p (ties with the last one
    kept); the rest at -inf."""
    ordered, _ = logprobs.sort(descending=True)
    probs = ordered.exp()
    mass_before = probs.cumsum(-1) - probs
    kept = int((mass_before < top_p * probs.sum()).sum())
    return logprobs.masked_fill(logprobs < ordered[kept - 1], float("-inf"))


def keep_top_k(logprobs: torch.Tensor, top_k: int) -> torch.Tensor:
    threshold = logprobs.topk(top_k).values[-1]
    return logprobs.masked_fill(logprobs < threshold, float("-inf"))
