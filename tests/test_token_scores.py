"""The LM head in chunks (mlxft.backends.mlx.model.token_scores, train.head_chunk): the same
log-probs, gradients, mean logits and entropies as the whole logits at once, and a peak that no
longer holds [positions, vocabulary] logits."""

from __future__ import annotations

from types import SimpleNamespace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlxft.backends.mlx import model as mlx_model
from mlxft.train import memory


class Head(nn.Module):
    """What token_scores reads of a model: its LM head (untied) and args."""

    def __init__(self, width: int, vocabulary: int, trainable: bool = False):
        super().__init__()
        self.lm_head = nn.Linear(width, vocabulary, bias=False)
        self.args = SimpleNamespace(tie_word_embeddings=False, vocab_size=vocabulary)
        if not trainable:
            self.lm_head.freeze()


def reference(head, hidden, tokens):
    logits = head.lm_head(hidden).astype(mx.float32)
    logps = -nn.losses.cross_entropy(logits, tokens)
    entropy = mx.logsumexp(logits, axis=-1) - (mx.softmax(logits, axis=-1) * logits).sum(-1)
    return logps, logits.mean(-1), entropy


def setup(rows=3, positions=37, width=24, vocabulary=301, trainable=False):
    mx.random.seed(0)
    head = Head(width, vocabulary, trainable)
    head.lm_head.weight = mx.random.normal((vocabulary, width)) * 0.5  # peaked logits: gradients that differ
    hidden = mx.random.normal((rows, positions, width))
    tokens = mx.random.randint(0, vocabulary, (rows, positions))
    weights = (mx.random.uniform(shape=(rows, positions)) > 0.3).astype(mx.float32)
    return head, hidden, tokens, weights


@pytest.mark.parametrize("chunk", [0, 1, 7, 64, 10_000])
def test_chunks_give_the_whole_logits_values_and_gradient(chunk):
    head, hidden, tokens, weights = setup()
    want = reference(head, hidden, tokens)
    got = mlx_model.token_scores(head, hidden, tokens, chunk, extras=True)
    for a, b in zip(got, want):
        assert np.abs(np.array(a) - np.array(b)).max() < 2e-5
    loss = lambda h: (mlx_model.token_scores(head, h, tokens, chunk) * weights).sum()  # noqa: E731
    plain = lambda h: (reference(head, h, tokens)[0] * weights).sum()  # noqa: E731
    g, g0 = mx.grad(loss)(hidden), mx.grad(plain)(hidden)
    assert np.abs(np.array(g - g0)).max() / np.abs(np.array(g0)).max() < 1e-5
    # a masked position has no gradient at all
    assert float(mx.abs(g * (1 - weights)[..., None]).max()) == 0.0


def test_the_gradient_is_the_backward_pass_of_a_compiled_step_too():
    head, hidden, tokens, weights = setup()
    step = mx.compile(mx.value_and_grad(lambda h: (mlx_model.token_scores(head, h, tokens, 16) * weights).sum()))
    value, g = step(hidden)
    value0, g0 = mx.value_and_grad(lambda h: (reference(head, h, tokens)[0] * weights).sum())(hidden)
    assert float(value) == pytest.approx(float(value0), rel=1e-6)
    assert np.abs(np.array(g - g0)).max() / np.abs(np.array(g0)).max() < 1e-5


def test_a_trainable_head_gets_its_own_gradient():
    head, hidden, tokens, weights = setup(trainable=True)
    assert mlx_model.head_trains(head)
    grads = nn.value_and_grad(head, lambda m: (mlx_model.token_scores(m, hidden, tokens, 16) * weights).sum())(head)[1]
    want = nn.value_and_grad(head, lambda m: (reference(m, hidden, tokens)[0] * weights).sum())(head)[1]
    a, b = np.array(grads["lm_head"]["weight"]), np.array(want["lm_head"]["weight"])
    assert np.abs(a).max() > 0 and np.abs(a - b).max() / np.abs(b).max() < 1e-5


def peak_of(fn) -> float:
    mx.eval(fn())  # traced and warm
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    mx.eval(fn())
    return (mx.get_peak_memory() - before) / 1e6


def test_chunks_bound_the_peak_by_the_chunk_not_the_positions():
    # 2,048 positions x 32,768 words: one float32 copy of the logits is 268 MB
    head, hidden, tokens, weights = setup(rows=4, positions=512, width=32, vocabulary=32_768)
    mx.eval(head.parameters(), hidden, tokens, weights)
    step = lambda chunk: mx.value_and_grad(  # noqa: E731
        lambda h: (mlx_model.token_scores(head, h, tokens, chunk) * weights).sum())(hidden)
    whole, half, chunked = peak_of(lambda: step(0)), peak_of(lambda: step(128)), peak_of(lambda: step(64))
    assert whole > 500  # at least two [2048, 32768] float32 arrays at once
    # measured: 806, 185 and 92 MB; the peak follows the chunk (a few of its arrays at once)
    assert half < 0.3 * whole and chunked < 0.6 * half, (whole, half, chunked)


def test_chunk_rows_follows_the_vocabulary():
    assert memory.head_chunk_rows(None, 49_152) == 85 and memory.head_chunk_rows(None, 151_936) == 27
    assert memory.head_chunk_rows(0, 49_152) == 0 and memory.head_chunk_rows(100, 49_152) == 100


# --- PyTorch ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [0, 1, 7, 10_000])
def test_torch_chunks_give_the_whole_logits_values_and_gradient(chunk):
    torch = pytest.importorskip("torch")
    from mlxft.backends.torch import model as torch_model

    torch.manual_seed(0)
    head = SimpleNamespace(lm_head=torch.nn.Linear(24, 301, bias=False))
    head.lm_head.weight.data *= 5
    head.lm_head.requires_grad_(False)
    hidden = torch.randn(3, 37, 24, requires_grad=True)
    tokens, weights = torch.randint(0, 301, (3, 37)), (torch.rand(3, 37) > 0.3).float()
    logits = head.lm_head(hidden).float()
    want_logps = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
    want_entropy = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    (g0,) = torch.autograd.grad((want_logps * weights).sum(), hidden)
    logps, means, entropy = torch_model.token_scores(head, hidden, tokens, chunk, extras=True)
    (g,) = torch.autograd.grad((logps * weights).sum(), hidden)
    assert (logps - want_logps).abs().max() < 2e-5 and (means - logits.mean(-1)).abs().max() < 1e-5
    assert (entropy - want_entropy).abs().max() < 2e-5
    assert (g - g0).abs().max() / g0.abs().max() < 1e-5
    with torch.no_grad():  # a reference pass: no gradient made, the same log-probs
        assert (torch_model.token_scores(head, hidden, tokens, chunk) - want_logps).abs().max() < 2e-5
