"""Backend-neutral pieces of a training loop, shared by the MLX and PyTorch trainers: the batch
stream that makes resume exact, best-metric tracking, and how metrics are printed.

Each backend keeps its own loop (one readable file per method and backend); what is here is pure.
"""

from __future__ import annotations

import math

import numpy as np

from mlxft.config import HIGHER_IS_BETTER
from mlxft.data.batching import iterate_batches
from mlxft.data.encode import answer_token_ids
from mlxft.errors import UserError


def answer_ids_for(tokenizer, splits, answers):
    """The Yes/No token ids when every validation answer is one of the recipe's answers."""
    if not answers or len(answers) != 2 or splits.schema != "alpaca" or not splits.valid:
        return None
    if any(r.get("output") not in answers for r in splits.valid):
        return None
    return answer_token_ids(tokenizer, answers)


def batch_stream(examples, tc, pad_id, skip: int, pad_to_multiple: int, iterate=iterate_batches):
    """Micro-batches forever, epoch after epoch; epoch e's order depends only on (seed, e), so a
    resumed run skips exactly the batches it already trained on. `iterate` makes one epoch's
    batches (iterate_pair_batches for preference pairs); each backend pads to its own PAD_MULTIPLE."""
    per_epoch = math.ceil(len(examples) / tc.batch_size)
    epoch = skip // per_epoch
    offset = skip % per_epoch
    while True:
        for i, batch in enumerate(iterate(examples, tc.batch_size, pad_id, seed=tc.seed * 7919 + epoch,
                                          pad_to_multiple=pad_to_multiple)):
            if i < offset:
                continue
            yield batch, epoch + (i + 1) / per_epoch
        epoch, offset = epoch + 1, 0


def count_steps(tc, rows: int) -> int:
    """Optimizer steps of a run: train.steps, else train.epochs (default 1) over `rows` rows."""
    if tc.steps:
        return tc.steps
    micro_per_epoch = math.ceil(rows / tc.batch_size)
    return max(1, math.ceil((tc.epochs or 1) * micro_per_epoch / tc.grad_accumulation))


def track_best(record, best, stale, metric):
    key = f"eval_{metric}"
    if key not in record:
        raise UserError(f"eval.metric '{metric}' is not measured on this data (have: "
                        f"{', '.join(k[5:] for k in record if k.startswith('eval_'))})")
    value = record[key]
    better = best is None or (value > best["value"] if metric in HIGHER_IS_BETTER else value < best["value"])
    if better:
        return {"metric": metric, "value": value, "step": record["step"]}, 0, True
    return best, stale + 1, False


def describe(metrics: dict, strip: str = "") -> str:
    """'loss 0.2310, auc 0.5320' from {'eval_loss': ..., 'eval_auc': ...} with strip='eval_'."""
    return ", ".join(f"{k.removeprefix(strip)} {v:.4g}" if isinstance(v, float) else f"{k.removeprefix(strip)} {v}"
                     for k, v in metrics.items())


def mean_rate(history):
    rates = [r["tokens_per_second"] for r in history if "tokens_per_second" in r]
    return float(np.mean(rates)) if rates else None


def answer_held_out(generate_answer, model, tokenizer, splits, config) -> list[dict]:
    """Answers of the trained model to the first held-out rows (test split, else validation), each
    rendered with the run's template; `generate_answer(model, tokenizer, prompt, max_tokens=...)` is
    the backend's."""
    from mlxft.data.templates import render

    rows = (splits.test or splits.valid)[: config.eval.generate_examples]
    answers = []
    for record in rows:
        prompted = render(record, splits.schema, splits.template, tokenizer,
                          completion_field=config.data.completion_field, system_prompt=config.data.system_prompt)
        answer = generate_answer(model, tokenizer, prompted.prompt, max_tokens=config.eval.max_new_tokens)
        answers.append({"origin": record.origin, "prompt": prompted.prompt, "answer": answer,
                        "expected": prompted.completion})
    return answers
