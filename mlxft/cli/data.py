"""`mlxft data`: convert public data sets into rows, split them, inspect them."""

from __future__ import annotations

import json
from pathlib import Path

import click

from mlxft.cli.common import Group, cli, load_any
from mlxft.errors import UserError


@cli.group(cls=Group)
def data():
    """Convert, split and inspect data sets."""


@data.group(cls=Group)
def convert():
    """Convert public data sets into training rows."""


@convert.command("mind")
@click.argument("mind_dir", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Folder for train.jsonl, valid.jsonl and test.jsonl.")
@click.option("--max-history", type=click.IntRange(min=1), default=None,
              help="Show at most this many liked + disliked titles (the most recent). Default: all.")
@click.option("--use-history/--no-use-history", default=False, show_default=True,
              help="Add the titles of the History column as extra liked titles.")
@click.option("--min-impressions", type=click.IntRange(min=2), default=5, show_default=True,
              help="Skip behaviors rows with fewer impressions (the last one is the target).")
@click.option("--split", "fractions", default="0.85,0.10,0.05", show_default=True,
              help="Train, validation and test fractions.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the split.")
def convert_mind_command(mind_dir, out_dir, max_history, use_history, min_impressions, fractions, seed):
    """MIND folder (behaviors.tsv + news.tsv) -> TALLRec Yes/No rows.

    Per behaviors row with enough impressions, every impression but the last becomes a liked or
    disliked title and the last is the target, answered "Yes." or "No.". The files are streamed,
    so MIND-large works in little memory.
    """
    from mlxft.data.sources.mind import convert_mind
    from mlxft.data.splits import parse_fractions

    stats = convert_mind(mind_dir, out_dir, fractions=parse_fractions(fractions), seed=seed,
                         max_history=max_history, use_history=use_history, min_impressions=min_impressions)
    click.echo(stats.summary())
    click.echo(f"wrote {out_dir}/train.jsonl, valid.jsonl, test.jsonl")


@convert.command("movielens")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Folder for train.jsonl, valid.jsonl and test.jsonl.")
@click.option("--max-history", type=click.IntRange(min=1), default=10, show_default=True,
              help="Ratings before each target shown as liked / disliked movies.")
@click.option("--max-rows", type=click.IntRange(min=1), default=10_000, show_default=True,
              help="Keep the last rows (TALLRec keeps 10,000).")
@click.option("--split", "fractions", default="0.8,0.1,0.1", show_default=True, help="Train, validation and test fractions.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the split.")
def convert_movielens_command(folder, out_dir, max_history, max_rows, fractions, seed):
    """MovieLens-100K folder (u.data + u.item) -> TALLRec's movie rows (a rating above 3 is a like).

    Each user's ratings in time order; every rating after the first MAX_HISTORY is a target
    answered "Yes." or "No.", the ones before it its history.
    """
    from mlxft.data.sources.ratings import convert_ratings
    from mlxft.data.splits import parse_fractions

    stats = convert_ratings("movielens", folder, out_dir, fractions=parse_fractions(fractions), seed=seed,
                            history=max_history, last=max_rows)
    click.echo(stats.summary())
    click.echo(f"wrote {out_dir}/train.jsonl, valid.jsonl, test.jsonl")


@convert.command("bookcrossing")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Folder for train.jsonl, valid.jsonl and test.jsonl.")
@click.option("--max-history", type=click.IntRange(min=1), default=10, show_default=True,
              help="Ratings shown as liked / disliked books before the target.")
@click.option("--split", "fractions", default="0.8,0.1,0.1", show_default=True, help="Train, validation and test fractions.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the split.")
def convert_bookcrossing_command(folder, out_dir, max_history, fractions, seed):
    """Book-Crossing folder (BX-Book-Ratings.csv + BX-Books.csv) -> TALLRec's book rows.

    One row per user with more than 3 ratings: the ratings shuffled (seed 42, as TALLRec), the
    last one the target ("Yes." for a rating above 5), up to MAX_HISTORY before it the history.
    """
    from mlxft.data.sources.ratings import convert_ratings
    from mlxft.data.splits import parse_fractions

    stats = convert_ratings("bookcrossing", folder, out_dir, fractions=parse_fractions(fractions), seed=seed,
                            history=max_history)
    click.echo(stats.summary())
    click.echo(f"wrote {out_dir}/train.jsonl, valid.jsonl, test.jsonl")


@convert.command("pairs")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--out", "out_file", required=True, type=click.Path(path_type=Path), help="Output JSONL of prompt/chosen/rejected rows.")
@click.option("--support-ratio", type=click.FloatRange(0, 1), required=True,
              help="The first ratio x N rows prefer the supporting answer, the rest the opposing one.")
@click.option("--max-rows", type=click.IntRange(min=1), default=None, help="Use only the first N rows.")
@click.option("--prompt-field", default="prompt", show_default=True, help="Column holding the prompt.")
@click.option("--support-field", default="support", show_default=True, help="Column holding the supporting answer.")
@click.option("--oppose-field", default="oppose", show_default=True, help="Column holding the opposing answer.")
def convert_pairs_command(file, out_file, support_ratio, max_rows, prompt_field, support_field, oppose_field):
    """Rows with two opposing answers -> DPO preference pairs (prompt, chosen, rejected)."""
    from mlxft.data.records import load_records, write_jsonl
    from mlxft.data.sources.pairs import opposing_to_preference

    rows = opposing_to_preference(load_records(file), support_ratio, max_rows, prompt_field=prompt_field,
                                  support_field=support_field, oppose_field=oppose_field)
    write_jsonl(rows, out_file)
    click.echo(f"wrote {len(rows)} pairs to {out_file}")


@data.command("split")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Folder for train/valid/test.jsonl.")
@click.option("--split", "fractions", default="0.85,0.10,0.05", show_default=True, help="Train, validation and test fractions.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the split and of the K-shot draw.")
@click.option("--k-shot", type=click.IntRange(min=1), default=None, help="Keep only K training rows, sampled with the seed.")
def split_command(file, out_dir, fractions, seed, k_shot):
    """Split a JSON/JSONL/CSV file into seeded train / validation / test JSONL files."""
    from mlxft.data.records import load_records, write_jsonl
    from mlxft.data.splits import parse_fractions, sample_k_shot, split_items

    rows = [r.fields for r in load_records(file)]
    train, valid, test = split_items(rows, parse_fractions(fractions), seed)
    if k_shot:
        train = sample_k_shot(train, k_shot, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", train), ("valid", valid), ("test", test)):
        write_jsonl(part, out_dir / f"{name}.jsonl")
    click.echo(f"wrote {len(train)} train, {len(valid)} valid, {len(test)} test rows to {out_dir}")


@data.command("inspect")
@click.argument("file")
@click.option("--tokenizer", "tokenizer_name", default="builtin", show_default=True,
              help="Model whose tokenizer counts tokens: 'builtin', a local folder or a hub id.")
@click.option("--template", default="auto", show_default=True,
              help="auto, alpaca, phi3, chat, plain, or a format string with {column} placeholders.")
@click.option("--completion-field", default=None, help="Column holding the answer, with a format string.")
@click.option("--cutoff", type=click.IntRange(min=1), default=512, show_default=True, help="Cutoff length in tokens.")
@click.option("--train-on-inputs", is_flag=True, help="Score the prompt tokens too.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--trust-remote-code", is_flag=True, help="Allow a hub tokenizer to run its own code.")
@click.option("--column", "columns", multiple=True, metavar="FIELD=COLUMN",
              help="Read a field from a column of another name, like --column instruction=question (repeatable; data.columns).")
@click.option("--max-rows", type=click.IntRange(min=1), default=None,
              help="Read at most this many rows (of each split); a Hugging Face data set then streams them.")
def inspect_command(file, tokenizer_name, template, completion_field, cutoff, train_on_inputs, as_json, trust_remote_code,
                    columns, max_rows):
    """Schema, row count, token lengths, label balance and one example with its loss mask.

    FILE is a .json/.jsonl/.csv file, a MIND folder (converted on the fly), or a Hugging Face
    data set, hf:NAME[:CONFIG][@SPLIT] (every split, unless one is named).
    """
    from mlxft.data.inspect import format_inspection, inspect_records
    from mlxft.data.templates import schema_and_template
    from mlxft.models.files import load_tokenizer

    mapping = {}
    for item in columns:
        field, sep, column = item.partition("=")
        if not sep or not field.strip() or not column.strip():
            raise UserError(f"--column {item!r}: expected FIELD=COLUMN, like instruction=question")
        mapping[field.strip()] = column.strip()
    records = load_any(file, mapping, max_rows)
    schema, template = schema_and_template(records, template, completion_field)  # fail before loading
    tokenizer = load_tokenizer(tokenizer_name, trust_remote_code=trust_remote_code)
    info = inspect_records(records, tokenizer, source=str(file), schema=schema, template=template,
                           completion_field=completion_field, cutoff=cutoff, train_on_inputs=train_on_inputs)
    click.echo(json.dumps(info.to_dict(), indent=2) if as_json else format_inspection(info))
