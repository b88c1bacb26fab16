"""MIND news logs -> TALLRec rows ("will this user like the target news? Yes./No.").

    from mlxft.data.sources.mind import convert_mind
    convert_mind("MINDsmall_train", "data/tallrec")   # writes train/valid/test.jsonl

Each behaviors.tsv row with at least `min_impressions` impressions becomes one Alpaca row: every
impression but the last is a liked (clicked) or disliked title, and the last one is the target,
answered "Yes." or "No.". With `use_history`, the History column's clicks are older liked titles.

MIND-large's behaviors.tsv is gigabytes, so it is read one line at a time and rows are split as
they stream past; only news.tsv (id -> title, ~160k rows) is held in memory.

Raises UserError (one line, naming file:line) for a missing folder or file, a malformed row, a
news id that news.tsv lacks, and a folder that yields no rows at all.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlxft.data.splits import DEFAULT_FRACTIONS
from mlxft.data.text import read_lines
from mlxft.errors import UserError
from mlxft.files import temporary_file

INSTRUCTION = (
    "Given the user's preference and unpreference, identify whether the user will like the "
    'target news by answering "Yes." or "No."'
)
SPLITS = ("train", "valid", "test")


@dataclass
class ConvertStats:
    rows_read: int = 0  # non-blank behaviors.tsv rows
    rows_written: int = 0
    skipped_few_impressions: int = 0
    yes: int = 0
    no: int = 0
    train: int = 0
    valid: int = 0
    test: int = 0

    def summary(self) -> str:
        return (
            f"{self.rows_read} behaviors rows read, {self.rows_written} rows written "
            f"({self.yes} Yes / {self.no} No; {self.train} train, {self.valid} valid, {self.test} test), "
            f"{self.skipped_few_impressions} skipped with too few impressions"
        )


def iter_tallrec_rows(
    mind_dir: str | Path,
    *,
    max_history: int | None = None,
    use_history: bool = False,
    min_impressions: int = 5,
    stats: ConvertStats | None = None,
    keep=None,
) -> Iterator[dict]:
    """Yield one TALLRec row per behaviors.tsv row with enough impressions, in file order.

    `max_history` caps the liked + disliked titles shown, keeping those nearest the target.
    `stats`, when given, is updated as rows stream past. `keep(seen, max_history)` picks the
    titles shown (default: recent_titles).
    """
    keep = keep or recent_titles
    if max_history is not None and max_history < 0:
        raise UserError(f"max_history must be 0 or more, got {max_history}")
    if min_impressions < 1:
        raise UserError(f"min_impressions must be at least 1 (the target), got {min_impressions}")
    behaviors_path, news_path = _mind_files(mind_dir)
    titles = _read_titles(news_path)
    stats = stats if stats is not None else ConvertStats()

    for number, line in _numbered_lines(behaviors_path):
        where = f"{behaviors_path}:{number}"
        columns = line.split("\t")
        if len(columns) != 5:
            raise UserError(
                f"{where}: {len(columns)} tab-separated columns, expected 5 "
                "(impression id, user id, time, history, impressions)"
            )
        impression_id, user_id, _, history, impressions = columns
        stats.rows_read += 1
        shown = [_parse_impression(token, where) for token in impressions.split()]
        if len(shown) < min_impressions:
            stats.skipped_few_impressions += 1
            continue

        # (news id, liked) oldest first; the History column predates this impression.
        seen = [(news_id, True) for news_id in history.split()] if use_history else []
        seen += shown[:-1]
        if max_history is not None:
            seen = keep(seen, max_history)
        target_id, target_liked = shown[-1]

        def title(news_id: str) -> str:
            if news_id not in titles:
                raise UserError(f"{where}: news id {news_id} is not in {news_path}")
            return titles[news_id]

        row = tallrec_row([(title(n), is_liked) for n, is_liked in seen], title(target_id), target_liked)
        row.update(impression_id=impression_id, user_id=user_id)
        stats.rows_written += 1
        if target_liked:
            stats.yes += 1
        else:
            stats.no += 1
        yield row

    if stats.rows_written == 0:
        raise UserError(
            f"{behaviors_path}: no rows to write: {stats.skipped_few_impressions} of "
            f"{stats.rows_read} rows had fewer than {min_impressions} impressions"
        )


def recent_titles(seen: list, max_history: int) -> list:
    """The `max_history` most recent of `seen` (oldest first), or none for 0."""
    return seen[-max_history:] if max_history else []


def tallrec_row(seen: list[tuple[str, bool]], target: str, liked: bool) -> dict:
    """The Alpaca row for one target: (title, liked) context oldest first, then the question."""
    preference = ",".join(f'"{t}"' for t, is_liked in seen if is_liked)
    unpreference = ",".join(f'"{t}"' for t, is_liked in seen if not is_liked)
    return {
        "instruction": INSTRUCTION,
        "input": (
            f"User Preference: {preference}\n"
            f"User Unpreference: {unpreference}\n"
            f'Whether the user will like the target news "{target}"?'
        ),
        "output": "Yes." if liked else "No.",
    }


def iter_impressions(mind_dir: str | Path, *, max_history: int | None = 10) -> Iterator[tuple[str, list[dict]]]:
    """For ranking: (impression id, one row per candidate), in file order. The context is the
    user's History column (clicks before this impression), never another candidate's label, so
    every candidate of an impression is asked about with the same prompt but its own title."""
    behaviors_path, news_path = _mind_files(mind_dir)
    titles = _read_titles(news_path)
    for number, line in _numbered_lines(behaviors_path):
        where = f"{behaviors_path}:{number}"
        columns = line.split("\t")
        if len(columns) != 5:
            raise UserError(f"{where}: {len(columns)} tab-separated columns, expected 5")
        impression_id, user_id, _, history, impressions = columns
        clicked = history.split()
        if max_history is not None:
            clicked = recent_titles(clicked, max_history)
        missing = next((n for n in clicked if n not in titles), None)
        candidates = [_parse_impression(token, where) for token in impressions.split()]
        missing = missing or next((n for n, _ in candidates if n not in titles), None)
        if missing:
            raise UserError(f"{where}: news id {missing} is not in {news_path}")
        seen = [(titles[n], True) for n in clicked]
        rows = [{**tallrec_row(seen, titles[n], liked), "impression_id": impression_id, "user_id": user_id}
                for n, liked in candidates]
        yield impression_id, rows


PREFERENCE_INSTRUCTION = "Given the news this user clicked before, name a news title the user will click next."


def iter_preference_rows(mind_dir: str | Path, *, max_history: int | None = 10) -> Iterator[dict]:
    """For reward models and DPO: {prompt, chosen, rejected} rows, a clicked title preferred over
    a skipped one for the same user and history, in file order. An impression's clicked and
    skipped titles are paired in the order shown (each used once), so an impression with c clicks
    and s skips gives min(c, s) pairs. The prompt is the user's History column, as in
    iter_impressions: never another candidate's label."""
    for impression_id, rows in iter_impressions(mind_dir, max_history=max_history):
        clicked = [r for r in rows if r["output"] == "Yes."]
        skipped = [r for r in rows if r["output"] == "No."]
        for chosen, rejected in zip(clicked, skipped):
            preference = chosen["input"].split("\n", 1)[0]  # "User Preference: ..." (the same in every row)
            yield {"prompt": f"{PREFERENCE_INSTRUCTION}\n{preference}\nNext click:",
                   "chosen": _target_title(chosen["input"]), "rejected": _target_title(rejected["input"]),
                   "impression_id": impression_id, "user_id": chosen["user_id"]}


def _target_title(question: str) -> str:
    return question.rsplit('target news "', 1)[1].rsplit('"?', 1)[0]


def convert_mind(
    mind_dir: str | Path,
    out_dir: str | Path,
    *,
    fractions=DEFAULT_FRACTIONS,
    seed: int = 0,
    **options,
) -> ConvertStats:
    """Write train.jsonl, valid.jsonl and test.jsonl into `out_dir`; options go to iter_tallrec_rows.

    Rows are assigned to splits by one uniform draw each from a generator seeded with `seed`,
    so the split never needs all rows in memory and is the same on every run. Each file is
    written under a temporary name and renamed only once every row is written.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir}: is a file; name a folder for train.jsonl, valid.jsonl and test.jsonl")
    _mind_files(mind_dir)  # a wrong input folder is named before any output folder is made
    made = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _convert_into(mind_dir, out_dir, fractions, seed, options)
    except BaseException:
        if made and not any(out_dir.iterdir()):
            out_dir.rmdir()  # an error leaves no empty folder behind
        raise


def _convert_into(mind_dir, out_dir: Path, fractions, seed: int, options) -> ConvertStats:
    f_train, f_valid, _ = _normalised(fractions)
    stats = ConvertStats()
    rng = np.random.default_rng(seed)
    temps = {name: temporary_file(out_dir / f"{name}.jsonl") for name in SPLITS}
    try:
        for row in iter_tallrec_rows(mind_dir, stats=stats, **options):
            u = rng.random()
            name = "train" if u < f_train else "valid" if u < f_train + f_valid else "test"
            temps[name].write(json.dumps(row, ensure_ascii=False) + "\n")
            setattr(stats, name, getattr(stats, name) + 1)
        for f in temps.values():
            f.close()
        for name, f in temps.items():
            os.replace(f.name, out_dir / f"{name}.jsonl")
    except BaseException:
        for f in temps.values():
            f.close()
            Path(f.name).unlink(missing_ok=True)
        raise
    return stats


def _mind_files(mind_dir: str | Path) -> tuple[Path, Path]:
    mind_dir = Path(mind_dir)
    if not mind_dir.is_dir():
        raise UserError(f"{mind_dir}: no such folder (a MIND folder holds behaviors.tsv and news.tsv)")
    paths = mind_dir / "behaviors.tsv", mind_dir / "news.tsv"
    for path in paths:
        if not path.is_file():
            raise UserError(
                f"{mind_dir}: no {path.name} in this folder (a MIND folder holds behaviors.tsv and news.tsv)"
            )
    return paths


def _numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    # Only "\n" ends a row: a stray "\r" inside a title must not split it in two.
    for number, line in read_lines(path):
        if line.strip():
            yield number, line


def _read_titles(news_path: Path) -> dict[str, str]:
    titles = {}
    for number, line in _numbered_lines(news_path):
        columns = line.split("\t")
        if len(columns) < 4:
            raise UserError(
                f"{news_path}:{number}: {len(columns)} tab-separated columns, expected 8 "
                "(news id, category, subcategory, title, ...)"
            )
        titles[columns[0]] = columns[3]
    return titles


def _parse_impression(token: str, where: str) -> tuple[str, bool]:
    news_id, _, label = token.rpartition("-")
    if not news_id or label not in ("0", "1"):
        raise UserError(
            f"{where}: impression '{token}' is not of the form NewsID-1 or NewsID-0 "
            "(MIND test sets have no labels and cannot be converted)"
        )
    return news_id, label == "1"


def _normalised(fractions) -> tuple[float, float, float]:
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) < 0 or sum(fractions) <= 0:
        raise UserError(f"split fractions {fractions} must be three non-negative numbers, not all zero")
    total = sum(fractions)
    return tuple(f / total for f in fractions)
