"""The backend-neutral parts of a supervised fine-tuning run, shared by mlxft.backends.mlx.sft and
mlxft.backends.torch.sft: encoding the data, validation through a backend's evaluate, the Yes/No
answer tokens, the loss from the step's sums and the answers to held-out rows. No mlx, no torch.
"""

from __future__ import annotations

from mlxft.data.encode import answer_token_ids
from mlxft.errors import UserError
from mlxft.model_files import SPLIT_HEAD_TYPES, model_type


def answer_ids_for(tokenizer, splits, answers):
    """The Yes/No token ids when every validation answer is one of the recipe's answers."""
    if not answers or len(answers) != 2 or splits.schema != "alpaca" or not splits.valid:
        return None
    if any(r.get("output") not in answers for r in splits.valid):
        return None
    return answer_token_ids(tokenizer, answers)


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


def token_mean_loss(sums) -> dict:
    """SFT's metrics from its step sums [scored tokens, loss sum]: the mean loss per scored token."""
    return {"loss": float(sums[1]) / float(sums[0])}


def encode_sft_data(splits, tokenizer, config, echo) -> tuple[list, list, object]:
    """(train examples, validation examples, the train split's EncodeReport), with the data line printed."""
    from mlxft.data.dataset import encode_split
    from mlxft.data.templates import describe_template

    train_set, report = encode_split(splits.train, splits, tokenizer, config.data)
    valid_set = encode_split(splits.valid, splits, tokenizer, config.data, for_eval=True)[0] if splits.valid else []
    echo(f"data {splits.source}: {len(splits.train)} train / {len(splits.valid)} valid / {len(splits.test)} test rows; "
         f"template {describe_template(splits.template, tokenizer)}; {report.summary()}")
    return train_set, valid_set, report


def packed_train_set(train_set: list, config, can_pack: bool, folder, pad_multiple: int, echo) -> list:
    """The training examples packed into rows of data.packing_length tokens (default data.cutoff)
    when data.packing is on (mlxft.data.packing), else as they are; validation is never packed (its
    loss is per example)."""
    from mlxft.data.packing import describe_packing, pack

    if not config.data.packing:
        return train_set
    if not can_pack:
        raise UserError(f"data.packing needs a model whose attention takes mlxft's mask of packed rows: a "
                        f"{', '.join(sorted(SPLIT_HEAD_TYPES))} model without sliding-window layers (on PyTorch with "
                        f"attention sdpa or eager); {folder} is {model_type(folder) or 'of no known model_type'}")
    width = config.data.packing_length or config.data.cutoff
    rows = pack(train_set, width)
    echo(describe_packing(train_set, rows, width, config.train.batch_size, pad_multiple))
    return rows


def sft_validation(evaluate, model, valid_set, *, pad_id: int, split_head: bool, batch_size: int, answer_ids, world):
    """validate() -> eval_* metrics of the model on the validation examples ({} without any), through
    a backend's evaluate."""

    def validate() -> dict:
        if not valid_set:
            return {}
        result = evaluate(model, valid_set, pad_id=pad_id, split_head=split_head, batch_size=batch_size,
                          answer_ids=answer_ids, world=world)
        result.pop("probabilities", None)
        return {f"eval_{k}": v for k, v in result.items()}

    return validate
