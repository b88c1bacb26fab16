"""`mlxft eval auc` (and the sweep's test scores): a model, plus an adapter, scores Yes/No rows on
either backend. Backend-neutral: each backend's engine gives its model loader, LoRA layers and evaluate()."""

from __future__ import annotations


def score_yes_no(backend_name: str, model_name: str, adapter: str | None, records, *, template: str, answers: list[str],
                 batch_size: int = 32, trust_remote_code: bool = False) -> dict:
    """Load the model (+ adapter), encode the rows, and report AUC, balance and answer loss from
    the probabilities of the answers' first tokens at the first answer position."""
    from mlxft.backends import engine_for
    from mlxft.config import ModelConfig
    from mlxft.data.encode import answer_token_ids, encode_records
    from mlxft.data.templates import check_yes_no_rows
    from mlxft.models.adapters import attach_adapter
    from mlxft.models.files import pad_id

    engine = engine_for(backend_name)
    schema, template = check_yes_no_rows(records, template, answers)
    model, tokenizer, folder = engine.load(ModelConfig(name=model_name, trust_remote_code=trust_remote_code))
    if adapter:
        attach_adapter(engine.lora, model, adapter)
    examples, _ = encode_records(records, schema, template, tokenizer)
    ids = answer_token_ids(tokenizer, answers)
    result = engine.evaluate(model, examples, pad_id=pad_id(tokenizer), split_head=engine.can_split_head(model, folder),
                             batch_size=batch_size, answer_ids=ids)
    result["answer_token_ids"] = ids
    return result
