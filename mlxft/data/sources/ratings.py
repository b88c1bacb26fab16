"""TALLRec's own data sets -> its Yes/No rows: MovieLens-100K and Book-Crossing, as its
preprocess_movie.py and preprocess_book.py build them.

    from mlxft.data.sources.ratings import iter_movielens_rows, iter_bookcrossing_rows
    mlxft data convert movielens ml-100k --out data/movie      # or: mlxft lora --recipe tallrec-movie --data ml-100k
    mlxft data convert bookcrossing BX-CSV-Dump --out data/book

MovieLens-100K (u.data: user, item, rating, time, tab-separated; u.item: id|title|..., Latin-1):
a rating above 3 is a like. Each user's ratings in time order; every rating after the first 10 is
a target, the 10 before it the history. The last 10,000 such rows are kept (TALLRec's cut).

Book-Crossing (BX-Book-Ratings.csv and BX-Books.csv: ';'-separated, quoted, Latin-1): ratings
joined to books by ISBN; users with more than 3 ratings; a rating above 5 is a like (the 0s of
implicit feedback count as dislikes, as in TALLRec). Each user's ratings are shuffled with a
generator seeded by 42; the last is the target, up to 10 before it the history; one row a user.
Books are "Title" written by Author (TALLRec's target lacks the two spaces; here they are kept).

Each row is TALLRec's Alpaca row:
  instruction  Given the user's preference and unpreference, identify whether the user will like
               the target movie (book) by answering "Yes." or "No.".
  input        User Preference: "A", "B"\nUser Unpreference: "C"\nWhether the user will like the target movie "X"?
  output       Yes. / No.
TALLRec splits the movie rows by position and the book users at random; mlxft splits the rows
with its seeded split, as it splits MIND's (mlxft.data.splits).

Raises UserError (one line, naming file:line) for a missing folder or file and a malformed row;
Book-Crossing's known malformed lines (a stray quote or separator in a title) are skipped and
counted, as TALLRec's reader skips them.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlxft.errors import UserError

HISTORY = 10
MOVIE_ROWS = 10_000
MOVIE_FILES = ("u.data", "u.item")
BOOK_FILES = ("BX-Book-Ratings.csv", "BX-Books.csv")


def instruction(kind: str) -> str:
    return (f"Given the user's preference and unpreference, identify whether the user will like the target {kind} "
            'by answering "Yes." or "No.".')


def rating_row(kind: str, history: list[tuple[str, bool]], target: str, liked: bool) -> dict:
    """TALLRec's row: the history's liked and disliked items (quoted names, in order), the target."""
    liked_names = ", ".join(name for name, is_liked in history if is_liked)
    disliked_names = ", ".join(name for name, is_liked in history if not is_liked)
    return {"instruction": instruction(kind),
            "input": (f"User Preference: {liked_names}\nUser Unpreference: {disliked_names}\n"
                      f"Whether the user will like the target {kind} {target}?"),
            "output": "Yes." if liked else "No."}


@dataclass
class RatingStats:
    ratings: int = 0
    rows: int = 0
    skipped_lines: int = 0  # Book-Crossing lines that do not parse (TALLRec skips them too)

    def summary(self) -> str:
        skipped = f", {self.skipped_lines} malformed lines skipped" if self.skipped_lines else ""
        return f"{self.ratings} ratings read, {self.rows} rows{skipped}"


def files_of(folder: str | Path, names: tuple[str, ...], what: str) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder (a {what} folder holds {' and '.join(names)})")
    for name in names:
        if not (folder / name).is_file():
            raise UserError(f"{folder}: no {name} in this folder (a {what} folder holds {' and '.join(names)})")
    return [folder / name for name in names]


def rows_of(folder: Path):
    """iter_movielens_rows or iter_bookcrossing_rows, whichever data set `folder` holds; else None."""
    for names, read in ((MOVIE_FILES, iter_movielens_rows), (BOOK_FILES, iter_bookcrossing_rows)):
        if folder.is_dir() and all((folder / name).is_file() for name in names):
            return read
    return None


def latin1_lines(path: Path) -> Iterator[tuple[int, str]]:
    with open(path, encoding="latin-1", newline="") as f:
        for number, line in enumerate(f, start=1):
            line = line.rstrip("\r\n")
            if line.strip():
                yield number, line


def iter_movielens_rows(folder: str | Path, *, history: int = HISTORY, threshold: int = 3, last: int | None = MOVIE_ROWS,
                        stats: RatingStats | None = None) -> list[dict]:
    """TALLRec's movie rows of a MovieLens-100K folder (see the module docstring)."""
    data_path, item_path = files_of(folder, MOVIE_FILES, "MovieLens-100K")
    stats = stats or RatingStats()
    titles = {}
    for number, line in latin1_lines(item_path):
        columns = line.split("|")
        if len(columns) < 2:
            raise UserError(f"{item_path}:{number}: expected id|title|..., got {line[:60]!r}")
        titles[columns[0]] = columns[1]
    users: dict[str, list[tuple[int, str, bool]]] = {}
    for number, line in latin1_lines(data_path):
        columns = line.split("\t")
        try:
            user, item, rating, time = columns[0], columns[1], int(columns[2]), int(columns[3])
        except (IndexError, ValueError):
            raise UserError(f"{data_path}:{number}: expected user, item, rating, timestamp (tab-separated), "
                            f"got {line[:60]!r}") from None
        if item not in titles:
            raise UserError(f"{data_path}:{number}: item {item} is not in {item_path.name}")
        users.setdefault(user, []).append((time, item, rating > threshold))
        stats.ratings += 1
    rows = []
    for seen in users.values():  # users in the order they first appear, as TALLRec's dict keeps them
        seen.sort(key=lambda r: r[0])  # stable: equal times keep the file's order
        named = [(f'"{titles[item]}"', liked) for _, item, liked in seen]
        for i in range(history, len(named)):
            rows.append(rating_row("movie", named[i - history : i], named[i][0], named[i][1]))
    rows = rows[-last:] if last else rows
    stats.rows = len(rows)
    return rows


def read_bx(path: Path, stats: RatingStats) -> Iterator[tuple[int, list[str]]]:
    """A Book-Crossing CSV's data rows; lines with another number of fields than the header's
    (a title with a stray quote or separator) are counted in `stats.skipped_lines` and left out,
    as pandas' reader in TALLRec drops them."""
    columns = None
    for number, line in latin1_lines(path):
        fields = next(csv.reader(io.StringIO(line), delimiter=";", quotechar='"', escapechar="\\"), [])
        if columns is None:
            columns = len(fields)
        elif len(fields) != columns:
            stats.skipped_lines += 1
        else:
            yield number, fields


def iter_bookcrossing_rows(folder: str | Path, *, history: int = HISTORY, threshold: int = 5, min_ratings: int = 4,
                           seed: int = 42, stats: RatingStats | None = None) -> list[dict]:
    """TALLRec's book rows of a Book-Crossing folder (see the module docstring)."""
    ratings_path, books_path = files_of(folder, BOOK_FILES, "Book-Crossing")
    stats = stats or RatingStats()
    books = {fields[0]: f'"{fields[1]}" written by {fields[2]}' for _, fields in read_bx(books_path, stats)}
    users: dict[str, list[tuple[str, bool]]] = {}
    for number, fields in read_bx(ratings_path, stats):
        user, isbn, rating = fields[0], fields[1], fields[2]
        try:
            value = float(rating)
        except ValueError:
            raise UserError(f"{ratings_path}:{number}: rating {rating!r} is not a number") from None
        stats.ratings += 1
        if isbn in books:  # ratings of books the catalogue lacks are dropped (an inner join)
            users.setdefault(user, []).append((books[isbn], value > threshold))
    rows = []
    for seen in users.values():
        if len(seen) < min_ratings:
            continue
        order = np.random.default_rng(seed).permutation(len(seen))
        shuffled = [seen[i] for i in order]
        rows.append(rating_row("book", shuffled[:-1][:history], *shuffled[-1]))
    stats.rows = len(rows)
    return rows


def convert_ratings(kind: str, folder: str | Path, out_dir: str | Path, *, fractions, seed: int = 0, **options) -> RatingStats:
    """Write train.jsonl, valid.jsonl and test.jsonl of `kind` ("movielens" or "bookcrossing")
    rows into `out_dir`, split with mlxft's seeded split; each file is written whole or not at all."""
    from mlxft.data.records import write_jsonl
    from mlxft.data.splits import split_items

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir}: is a file; name a folder for train.jsonl, valid.jsonl and test.jsonl")
    stats = RatingStats()
    rows = (iter_movielens_rows if kind == "movielens" else iter_bookcrossing_rows)(folder, stats=stats, **options)
    if not rows:
        raise UserError(f"{folder}: no rows (too few ratings per user for a history and a target)")
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, part in zip(("train", "valid", "test"), split_items(rows, fractions, seed)):
        write_jsonl(part, out_dir / f"{name}.jsonl")
    return stats
