"""TALLRec's movie and book rows (mlxft.data.sources.ratings): literal rows from hand-written
files in the real formats, the bundled samples through the converter and the data loader, and
one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from mlxft.cli import cli
from mlxft.data.sources.ratings import iter_bookcrossing_rows, iter_movielens_rows
from mlxft.errors import UserError


def movielens(tmp_path, ratings):
    folder = tmp_path / "ml"
    folder.mkdir()
    (folder / "u.item").write_bytes("1|Toy Story (1995)|x\n2|Amélie (2001)|x\n3|Heat (1995)|x\n".encode("latin-1"))
    (folder / "u.data").write_text("".join(f"7\t{item}\t{stars}\t{time}\n" for item, stars, time in ratings))
    return folder


def test_movielens_rows_follow_time_with_the_ratings_before_each_target(tmp_path):
    # Written out of time order; 4 stars is a like, 3 is not. History 2: targets are the 3rd and 4th by time.
    folder = movielens(tmp_path, [(3, 4, 30), (1, 5, 10), (2, 3, 20), (1, 2, 40)])
    rows = iter_movielens_rows(folder, history=2)
    assert rows[0]["input"] == ('User Preference: "Toy Story (1995)"\nUser Unpreference: "Amélie (2001)"\n'
                                'Whether the user will like the target movie "Heat (1995)"?')
    assert rows[0]["output"] == "Yes." and rows[1]["output"] == "No."
    assert rows[1]["input"].startswith('User Preference: "Heat (1995)"\nUser Unpreference: "Amélie (2001)"\n')
    assert rows[0]["instruction"].endswith('the target movie by answering "Yes." or "No.".')
    assert len(iter_movielens_rows(folder, history=2, last=1)) == 1  # TALLRec keeps the last rows


def test_bookcrossing_rows_shuffle_each_user_with_a_fixed_seed(tmp_path):
    folder = tmp_path / "bx"
    folder.mkdir()
    (folder / "BX-Books.csv").write_bytes((
        '"ISBN";"Book-Title";"Book-Author";"Year-Of-Publication"\n'
        '"A";"Emma";"Jane Austen";"1815"\n"B";"Dune";"Frank Herbert";"1965"\n'
        '"C";"Ulysses";"James Joyce";"1922"\n"D";"Beloved";"Toni Morrison";"1987"\n'
        '"E";"broken "title" here;"\n').encode("latin-1"))
    (folder / "BX-Book-Ratings.csv").write_text(
        '"User-ID";"ISBN";"Book-Rating"\n"1";"A";"8"\n"1";"B";"0"\n"1";"C";"6"\n"1";"D";"5"\n"1";"Z";"9"\n'
        '"2";"A";"9"\n"2";"B";"9"\n"2";"C";"9"\n')  # user 2 has 3 ratings: too few; Z is not a book
    rows = iter_bookcrossing_rows(folder)
    assert len(rows) == 1
    names = ['"Emma" written by Jane Austen', '"Dune" written by Frank Herbert', '"Ulysses" written by James Joyce',
             '"Beloved" written by Toni Morrison']
    liked = [True, False, True, False]  # above 5 is a like; 0 (implicit) and 5 are not
    order = np.random.default_rng(42).permutation(4)
    *history, target = [(names[i], liked[i]) for i in order]
    assert rows[0]["input"] == (f"User Preference: {', '.join(n for n, like in history if like)}\n"
                                f"User Unpreference: {', '.join(n for n, like in history if not like)}\n"
                                f"Whether the user will like the target book {target[0]}?")
    assert rows[0]["output"] == ("Yes." if target[1] else "No.")


def test_the_bundled_samples_convert_and_load_on_the_fly(tmp_path):
    from mlxft.config import load_config
    from mlxft.data.dataset import load_splits
    from mlxft.resources import bundled

    runner = CliRunner()
    result = runner.invoke(cli, ["data", "convert", "movielens", str(bundled("data/movielens-sample")), "--out", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert "1004 ratings read, 604 rows" in result.output  # 40 users: every rating after each one's first 10
    counts = [len((tmp_path / "m" / f"{s}.jsonl").read_text().splitlines()) for s in ("train", "valid", "test")]
    assert counts == [484, 60, 60]  # 80/10/10 of 604
    result = runner.invoke(cli, ["data", "convert", "bookcrossing", str(bundled("data/bookcrossing-sample")), "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert "1 malformed lines skipped" in result.output
    row = json.loads((tmp_path / "b" / "train.jsonl").read_text().splitlines()[0])
    assert row["output"] in ("Yes.", "No.") and " written by " in row["input"]

    splits = load_splits(load_config("tallrec-movie").data)
    assert splits.schema == "alpaca" and len(splits.train) == 484 and "movielens-sample row " in splits.train[0].origin
    book = load_splits(load_config("tallrec-book").data)
    assert len(book.train) + len(book.valid) + len(book.test) == int(result.output.split(" rows")[0].split(", ")[-1])


def test_the_synthetic_histories_say_something_about_the_target():
    # The target's genre liked more often than not in the history predicts "Yes.": the recipes
    # have something to learn (each user likes one genre's items 80% of the time, others' 25%).
    from mlxft.data.sources.synthetic_ratings import GENRE_NOUNS
    from mlxft.resources import bundled

    genre = {noun: g for g, nouns in enumerate(GENRE_NOUNS) for noun in nouns}

    def genres(text):
        return [genre[w.strip('"(),?')] for w in text.split() if w.strip('"(),?') in genre]

    from mlxft.eval.metrics import roc_auc

    for rows in (iter_movielens_rows(bundled("data/movielens-sample")), iter_bookcrossing_rows(bundled("data/bookcrossing-sample"))):
        scores, labels = [], []
        for r in rows:
            liked, disliked, question = r["input"].split("\n")
            (target,) = genres(question)
            scores.append(genres(liked).count(target) - genres(disliked).count(target))
            labels.append(r["output"] == "Yes.")
        # measured: AUC 0.68 on the movie rows, 0.63 on the book rows; 0.5 is no signal
        assert roc_auc(np.array(scores, float), np.array(labels)) > 0.6


def test_missing_files_are_one_line_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no u.data in this folder"):
        iter_movielens_rows(tmp_path / "empty")
    result = CliRunner().invoke(cli, ["data", "convert", "bookcrossing", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    assert result.exit_code != 0 and "no such folder (a Book-Crossing folder holds" in result.output
    assert not (tmp_path / "o").exists()
    bad = movielens(tmp_path, [(1, 4, 1)])
    (bad / "u.data").write_text("7\t1\tfour\t1\n")
    with pytest.raises(UserError, match="u.data:1: expected user, item, rating, timestamp"):
        iter_movielens_rows(bad)
