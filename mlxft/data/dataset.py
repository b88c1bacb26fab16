"""A recipe's data section -> train / validation / test rows, and their encodings.

Sources, by what the path is:
- a MIND folder (behaviors.tsv + news.tsv): converted to TALLRec rows on the fly, then split;
- a MovieLens-100K or Book-Crossing folder: TALLRec's movie or book rows (mlxft.data.sources.ratings), then split;
- a folder with train.jsonl (+ valid.jsonl, test.jsonl): used as it is split;
- a .json / .jsonl / .csv file: split with the recipe's fractions and seed;
- hf:NAME[:CONFIG][@SPLIT], a Hugging Face data set (mlxft.data.sources.hub): a split named is
  split as a file is; without one, the data set's train / validation / test splits are used.
The rows read (of a file, and of each split a folder or data set has) are cut to the first
data.max_rows; a file's or data set's columns are renamed by data.columns as they are read.
K-shot sampling, when asked, draws K rows from the training split only, so every K is scored
on the same validation and test rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mlxft.data.encode import EncodeReport, Example, PreferenceExample, encode_preference_records, encode_records
from mlxft.data.records import Record, detect_schema, load_records, rename_columns
from mlxft.data.sources.hub import is_hub, read_hub
from mlxft.data.sources.mind import iter_preference_rows, iter_tallrec_rows
from mlxft.data.sources.pairs import opposing_to_preference
from mlxft.data.sources.ratings import HISTORY, rows_of
from mlxft.data.splits import sample_k_shot, split_items
from mlxft.data.templates import resolve_preference_template, schema_and_template
from mlxft.errors import UserError
from mlxft.resources import bundled


@dataclass
class Splits:
    train: list[Record]
    valid: list[Record]
    test: list[Record]
    schema: str | None
    template: str
    source: str


def resolve_source(source: str) -> Path:
    """A path as given, or a bundled sample named relative to the repository ('data/...')."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    if not path.is_absolute() and bundled(source).exists():
        return bundled(source)
    raise UserError(f"data {source}: no such file or folder")


def source_path(data) -> Path | None:
    """The recipe's data as a path; None for a Hugging Face data set (hf:...)."""
    return None if is_hub(data.source) else resolve_source(data.source)


Rows = list[Record] | tuple[list[Record], list[Record], list[Record]]  # to be split, or already train / valid / test


def read_rows(data, path: Path | None) -> Rows:
    """A file's rows, a folder's train.jsonl (+ valid.jsonl, test.jsonl), or a Hugging Face data
    set's rows (path None), their columns renamed by data.columns."""
    if path is None:
        return read_hub(data.source, columns=data.columns, max_rows=data.max_rows, streaming=data.streaming)
    if not path.is_dir():
        return rename_columns(load_records(path), data.columns)
    if not (path / "train.jsonl").exists():
        raise UserError(f"data {path}: a folder needs train.jsonl (and valid.jsonl, test.jsonl)")
    return tuple(rename_columns(load_records(path / f"{name}.jsonl"), data.columns) if (path / f"{name}.jsonl").exists() else []
                 for name in ("train", "valid", "test"))


def split_rows(rows: Rows, data, convert=lambda records: records, convert_test=None) -> tuple[list[Record], list[Record], list[Record]]:
    """Train, validation and test rows: the first data.max_rows of each list read, `convert`ed
    (`convert_test` for the test rows, when given); one list is converted whole, then split with the
    recipe's fractions and seed."""
    if isinstance(rows, list):
        return split_items(convert(rows[: data.max_rows]), tuple(data.split), data.seed)
    train, valid, test = (part[: data.max_rows] for part in rows)
    return convert(train), convert(valid) if valid else [], (convert_test or convert)(test) if test else []


def mind_records(path: Path, **options) -> list[Record]:
    """TALLRec rows of a MIND folder as records; their origin names the impression."""
    return [Record(row, f"{path}/behaviors.tsv impression {row['impression_id']}")
            for row in iter_tallrec_rows(path, **options)]


def mind_preference_records(path: Path, max_history: int | None = None) -> list[Record]:
    """A MIND folder's {prompt, chosen, rejected} pairs as records (iter_preference_rows)."""
    return [Record(row, f"{path}/behaviors.tsv impression {row['impression_id']}")
            for row in iter_preference_rows(path, max_history=max_history)]


def limit_rows(train: list[Record], valid: list[Record], data) -> tuple[list[Record], list[Record]]:
    """The recipe's limits: K training rows sampled (data.k_shot), the first data.max_valid_rows
    validation rows."""
    if data.k_shot:
        train = sample_k_shot(train, data.k_shot, data.seed if data.k_shot_seed is None else data.k_shot_seed)
    return train, valid[: data.max_valid_rows] if data.max_valid_rows else valid


def load_splits(data) -> Splits:
    """Rows for a DataConfig (see mlxft.config), split and checked against the template."""
    path = source_path(data)
    if path and path.is_dir() and (path / "behaviors.tsv").exists():
        rows = mind_records(path, max_history=data.max_history, use_history=data.use_history,
                            min_impressions=data.min_impressions)
    elif path and (read := rows_of(path)):  # TALLRec's own data sets, converted on the fly
        rows = [Record(row, f"{path} row {i + 1}") for i, row in enumerate(read(path, history=data.max_history or HISTORY))]
    elif path and path.is_dir() and not (path / "train.jsonl").exists():
        raise UserError(f"data {path}: a folder needs train.jsonl (and valid.jsonl, test.jsonl), MIND's behaviors.tsv + "
                        f"news.tsv, MovieLens-100K's u.data + u.item, or Book-Crossing's BX-Book-Ratings.csv + BX-Books.csv")
    else:
        rows = read_rows(data, path)
    train, valid, test = split_rows(rows, data)
    train, valid = limit_rows(train, valid, data)
    schema, template = schema_and_template(train, data.template, data.completion_field)
    for part in (valid, test):
        if part and schema:
            detect_schema(part)
    return Splits(train, valid, test, schema, template, str(path or data.source))


def encode_split(records: list[Record], splits: Splits, tokenizer, data, *, for_eval: bool = False) -> tuple[list[Example], EncodeReport]:
    """Encode one split; evaluation never scores the prompt, so its loss is the answers' loss (of
    the same assistant turns as training)."""
    return encode_records(
        records, splits.schema, splits.template, tokenizer,
        cutoff=data.cutoff,
        train_on_inputs=data.train_on_inputs and not for_eval,
        completion_field=data.completion_field,
        system_prompt=data.system_prompt,
        assistant_turns=data.assistant_turns,
    )


# --- preference pairs (DPO) ----------------------------------------------------------------------

def preference_records(records: list[Record], support_ratio: float | None) -> list[Record]:
    """{prompt, chosen, rejected} rows as they are, or {prompt, support, oppose} rows turned into
    pairs by the support ratio (in file order, before any split); anything else is a UserError."""
    schema = detect_schema(records)
    if schema == "opposing":
        if support_ratio is None:
            raise UserError(f"{records[0].origin}: rows with prompt, support and oppose need a support ratio to become "
                            "pairs: --set dpo.support_ratio=0.5 (the first half of the rows prefer 'support')")
        rows = opposing_to_preference(records, support_ratio)
        return [Record(row, record.origin) for row, record in zip(rows, records)]
    if schema != "preference":
        raise UserError(f"{records[0].origin}: DPO needs rows with prompt, chosen and rejected (or prompt, support and "
                        f"oppose with dpo.support_ratio), not {schema} rows with fields {sorted(records[0].fields)}")
    if support_ratio is not None:
        raise UserError(f"{records[0].origin}: dpo.support_ratio applies to prompt/support/oppose rows; "
                        "these rows already say which answer is chosen")
    return records


def prompt_records(records: list[Record]) -> list[Record]:
    """Rows that need only a prompt (answered before and after training)."""
    for record in records:
        if not isinstance(record.get("prompt"), (str, list)):
            raise UserError(f"{record.origin}: a row to answer needs a 'prompt' (a string or a list of messages)")
    return records


def unpaired_records(records: list[Record]) -> list[Record]:
    """KTO's rows {prompt, completion, label} as they are, or each {prompt, chosen, rejected} pair
    as two of them (chosen: label true), as TRL's unpair_preference_dataset does."""
    if all("completion" in r.fields and "label" in r.fields for r in records):
        for record in records:
            if not isinstance(record["label"], bool):
                raise UserError(f"{record.origin}: 'label' must be true (a desirable answer) or false, not {record['label']!r}")
        return records
    return [Record({**{k: v for k, v in r.fields.items() if k not in ("chosen", "rejected")}, "completion": r[side],
                    "label": side == "chosen"}, r.origin)
            for r in preference_records(records, None) for side in ("chosen", "rejected")]


def kto_pairs(records: list[Record]) -> list[Record]:
    """Unpaired rows as the pair layout carries them: {prompt, chosen: its completion, rejected: the
    next row's completion (the mismatched answer that estimates KTO's z₀), label}."""
    if len(records) == 1:
        raise UserError(f"{records[0].origin}: KTO needs at least two rows in a split (each is compared with another's answer)")
    return [Record({**r.fields, "chosen": r["completion"], "rejected": records[(i + 1) % len(records)]["completion"]},
                   r.origin) for i, r in enumerate(records)]


def load_preference_splits(data, support_ratio: float | None = None, unpaired: bool = False) -> Splits:
    """Train / validation / test preference rows for a DataConfig, checked against the template.

    A file is converted (support/oppose rows), then split with the recipe's fractions and seed; so
    is a MIND folder, as pairs of a clicked and a skipped title (iter_preference_rows); a
    folder holds train.jsonl (+ valid.jsonl, test.jsonl), each converted on its own. A test file
    of prompts alone ({id, prompt}, as in the DPO homework) is fine: it is only answered. `unpaired`
    (KTO): rows {prompt, completion, label}, or pairs split in two, laid out by kto_pairs."""
    if unpaired:
        if support_ratio is not None:
            raise UserError("dpo.support_ratio makes pairs; KTO reads {prompt, completion, label} rows (or pairs)")
        path = source_path(data)
        if path and path.is_dir():
            raise UserError(f"data {path}: KTO reads one file of {{prompt, completion, label}} rows (or pairs)")
        train, valid, test = split_rows(read_rows(data, path), data, unpaired_records, prompt_records)
        train, valid = limit_rows(train, valid, data)
        train, valid = kto_pairs(train), kto_pairs(valid) if valid else []
        template = resolve_preference_template(data.template, train + valid)
        return Splits(train, valid, prompt_records(test), "preference", template, str(path or data.source))
    path = source_path(data)
    if path and path.is_dir() and (path / "behaviors.tsv").exists():  # a clicked title preferred over a skipped one
        if support_ratio is not None:
            raise UserError(f"data {path}: dpo.support_ratio applies to prompt/support/oppose rows, not to a MIND folder")
        train, valid, test = split_rows(mind_preference_records(path, data.max_history), data)
    else:
        train, valid, test = split_rows(read_rows(data, path), data, lambda rows: preference_records(rows, support_ratio),
                                        prompt_records)
    train, valid = limit_rows(train, valid, data)
    template = resolve_preference_template(data.template, train + valid + test)
    return Splits(train, valid, test, "preference", template, str(path or data.source))


def load_prompt_splits(data) -> Splits:
    """Train / validation / test rows with a 'prompt' (any other fields are the reward functions',
    for online RL): a file split with the recipe's fractions and seed, a folder of train.jsonl
    (+ valid.jsonl, test.jsonl), or a Hugging Face data set."""
    path = source_path(data)
    train, valid, test = split_rows(read_rows(data, path), data)
    train, valid = limit_rows(train, valid, data)
    for record in train + valid:
        if not isinstance(record.get("prompt"), (str, list)):
            raise UserError(f"{record.origin}: RL needs rows with a 'prompt' (a string or a list of messages), "
                            f"not fields {sorted(record.fields)}")
    return Splits(train, valid, test, None, data.template, str(path or data.source))


def encode_preference_split(records: list[Record], splits: Splits, tokenizer, data, dpo) -> tuple[list[PreferenceExample], EncodeReport]:
    """Encode preference rows with the DPO section's lengths; long prompts and answers are cut and counted."""
    return encode_preference_records(records, splits.template, tokenizer, max_length=dpo.max_length,
                                     max_prompt_length=dpo.max_prompt_length, truncation_mode=dpo.truncation_mode,
                                     system_prompt=data.system_prompt)
