"""The reward model, backend-neutral: its loss, its metrics, its head, where it reads its score,
and its data. The trainers are mlxft.backends.<backend>.reward; this module has no mlx and no torch.

A reward model is the base model + a LoRA adapter + a scalar head (`score`, a [1, hidden] linear
layer without bias, trained in full), read at the last token of prompt + answer that is not
padding: the token transformers' AutoModelForSequenceClassification reads, so that the saved
adapter (PEFT's SEQ_CLS layout, the head in modules_to_save) scores the same there.

Trained on preference pairs with the Bradley-Terry loss, as TRL's RewardTrainer does:

    loss = −log σ(r(x, y_w) − r(x, y_l))  [+ c · (r(x, y_w) + r(x, y_l))²]

where c is reward.center_coefficient (TRL's center_rewards_coefficient; 0 by default), which keeps
rewards near zero. Metrics under TRL's names: accuracy (ties count half: 0.5 is chance), margin.
"""

from __future__ import annotations

import numpy as np

from mlxft.dpo_loss import log_sigmoid, pair_accuracies
from mlxft.errors import UserError

HEAD = "score"  # transformers' name for the head of *ForSequenceClassification
TASK_TYPE = "SEQ_CLS"
HEAD_INIT_STD = 0.02  # transformers' initializer_range for the head of a classification model


# --- the loss ----------------------------------------------------------------------------------------

# What a step or an evaluation reports, as sums that add up across micro-batches and reports.
STATISTICS = ("pairs", "loss", "accuracy", "margin", "rewards/chosen", "rewards/rejected")


def bradley_terry_losses(chosen, rejected, *, center_coefficient: float = 0.0, xp):
    """Per-pair losses from the scores of the chosen and rejected answers (same shape)."""
    losses = -log_sigmoid(chosen - rejected, xp)
    if center_coefficient:
        losses = losses + center_coefficient * (chosen + rejected) ** 2
    return losses


def reward_objective(scores, center_coefficient: float, *, xp, detach):
    """(sum of the batch's pair losses, STATISTICS sums) from the scores [2B] of a pair batch's
    rows (chosen rows, then rejected); `detach` is the backend's stop-gradient."""
    b = scores.shape[0] // 2
    chosen, rejected = scores[:b], scores[b:]
    losses = bradley_terry_losses(chosen, rejected, center_coefficient=center_coefficient, xp=xp)
    c, r, lo = detach(chosen), detach(rejected), detach(losses)
    sums = xp.stack([xp.zeros_like(lo).sum() + b, lo.sum(), pair_accuracies(c, r, xp).sum(), (c - r).sum(), c.sum(), r.sum()])
    return losses.sum(), sums


def summarize(sums) -> dict:
    """{'loss', 'accuracy', 'margin', 'rewards/chosen', 'rewards/rejected'}: means over pairs."""
    total = dict(zip(STATISTICS, (float(v) for v in sums)))
    pairs = max(total.pop("pairs"), 1.0)
    return {name: value / pairs for name, value in total.items()}


# --- the head and where it reads -----------------------------------------------------------------


def init_head(hidden_size: int, seed: int) -> np.ndarray:
    """A new head [1, hidden] (normal, std 0.02, as transformers initialises one), drawn in numpy
    so that both backends start from the same numbers."""
    return (np.random.default_rng(seed).standard_normal((1, hidden_size)) * HEAD_INIT_STD).astype(np.float32)


def score_positions(input_ids: np.ndarray, pad_id: int) -> np.ndarray:
    """Per row [N], the index of its last token that is not padding, found as transformers finds
    it (the rightmost id other than pad_token_id): when the pad token is also the end-of-sequence
    token, an answer's closing EOS is padding to transformers, and so it is here."""
    real = input_ids != pad_id
    if not real.any(axis=1).all():
        raise UserError("a row to score is all padding tokens; is the tokenizer's pad token its only token?")
    return (input_ids.shape[1] - 1 - np.argmax(real[:, ::-1], axis=1)).astype(np.int32)


def load_instructions(pad_id: int) -> str:
    """How to load a saved reward adapter in transformers + PEFT (printed after training)."""
    return (f"AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, pad_token_id={pad_id}); "
            "PeftModel.from_pretrained(model, adapter)")


def check_reward_run(config) -> None:
    """What a reward run cannot do yet, said before a model loads."""
    from mlxft.errors import NotImplementedYet

    if config.lora.full_finetune:
        raise NotImplementedYet("reward models train a LoRA adapter and the head; full fine-tuning of a reward model "
                                "is not built yet (drop lora.full_finetune)")
    if config.eval.metric not in ("loss", "accuracy", "margin"):
        raise UserError(f"eval.metric '{config.eval.metric}' is not a reward model metric; use loss, accuracy or margin")


# --- the run, before and after its model ------------------------------------------------------------


def load_reward_data(config):
    """The run's preference splits ({prompt, chosen, rejected} rows, or pairs from a MIND folder),
    with its reward settings checked: everything that can be wrong before a model loads."""
    from mlxft.data.dataset import load_preference_splits

    check_reward_run(config)
    config.reward.check()
    return load_preference_splits(config.data)


def saved_head(adapter, hidden_size: int, *, required: bool = True) -> np.ndarray | None:
    """The head [1, hidden] saved beside an adapter (modules_to_save); without one, a UserError,
    or None when not `required` (an SFT adapter a reward run starts from)."""
    from mlxft.adapters import load_saved_modules

    saved = load_saved_modules(adapter).get(f"{HEAD}.weight")
    if saved is None:
        if required:
            raise UserError(f"adapter {adapter}: no reward head ({HEAD}.weight) saved beside it")
        return None
    if saved.shape != (1, hidden_size):
        raise UserError(f"adapter {adapter}: its reward head is {list(saved.shape)}, this model needs [1, {hidden_size}]")
    return saved.astype(np.float32)


def start_head(hidden_size: int, start_from, seed: int) -> np.ndarray:
    """The head a run starts from: the one saved beside the adapter it continues (a reward adapter,
    or a resumed run's checkpoint), else a new one."""
    saved = saved_head(start_from, hidden_size, required=False) if start_from else None
    return init_head(hidden_size, seed) if saved is None else saved


def reward_spec(spec):
    """An adapter spec as a reward model saves it: SEQ_CLS, the head in modules_to_save."""
    from dataclasses import replace

    return replace(spec, task_type=TASK_TYPE, modules_to_save=[HEAD])


def describe_reward(policy_line: str, hidden_size: int, rc) -> str:
    return (f"{policy_line}, of which {hidden_size:,} the reward head; Bradley-Terry loss"
            + (f", centred ({rc.center_coefficient:g})" if rc.center_coefficient else ""))


def evaluate_pairs(backend, model: str, adapter: str, source, *, template: str = "auto", batch_size: int = 32,
                   trust_remote_code: bool = False, lengths=None) -> dict:
    """`mlxft eval reward`: a saved reward model on a file of {prompt, chosen, rejected} rows (or a
    MIND folder's pairs). {'pairs', 'loss', 'accuracy', 'margin', 'rewards/chosen', 'rewards/rejected',
    'scores': [[chosen, rejected], ...] in file order}. `backend`: 'mlx' or 'torch'."""
    from pathlib import Path

    from mlxft.config import RewardConfig
    from mlxft.data.batching import iterate_pair_batches
    from mlxft.data.dataset import mind_preference_records, preference_records, resolve_source
    from mlxft.data.encode import encode_preference_records
    from mlxft.data.records import load_records
    from mlxft.data.templates import resolve_preference_template
    from mlxft.model_files import pad_id as pad_id_of

    path = resolve_source(str(source))
    if Path(path).is_dir() and (Path(path) / "behaviors.tsv").exists():
        records = mind_preference_records(path)
    else:
        records = preference_records(load_records(path), None)
    from mlxft.backends import engine_for

    tokenizer, score = engine_for(backend).load_scorer(model, adapter, trust_remote_code=trust_remote_code)
    rc = lengths or RewardConfig()
    pairs, _ = encode_preference_records(records, resolve_preference_template(template, records, tokenizer), tokenizer,
                                         max_length=rc.max_length, max_prompt_length=rc.max_prompt_length,
                                         truncation_mode=rc.truncation_mode)
    pad_id = pad_id_of(tokenizer)
    scores = np.zeros((len(pairs), 2), np.float64)
    for batch in iterate_pair_batches(pairs, batch_size, pad_id, shuffle=False):
        values = score(batch.batch.input_ids)
        scores[batch.index, 0], scores[batch.index, 1] = values[: batch.pairs], values[batch.pairs:]
    sums = reward_objective(scores.reshape(-1, order="F"), 0.0, xp=np, detach=lambda x: x)[1]
    return {"pairs": len(pairs), **summarize(sums), "scores": scores.round(6).tolist()}
