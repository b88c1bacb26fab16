"""The bundled samples: deterministic, committed exactly as data/make_samples.py writes them,
well-formed, and (for MIND) carrying a personalised signal that simple baselines can find."""

from __future__ import annotations

import csv
import importlib.util
import json
import re
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from mlxft.data.sources import synthetic, synthetic_mind
from mlxft.data.sources.synthetic import SAMPLE_FILES, write_samples
from mlxft.data.sources.synthetic_mind import DEFAULT_SEED, TOPICS, mind_signal_report
from mlxft.eval.metrics import roc_auc

DATA = Path(__file__).resolve().parent.parent / "data"
MIND = DATA / "mind-sample"


def _load_script():
    spec = importlib.util.spec_from_file_location("make_samples", DATA / "make_samples.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script_output(tmp_path_factory):
    """What `python data/make_samples.py` writes with its defaults, into a temporary folder."""
    out = tmp_path_factory.mktemp("samples")
    assert _load_script().main(["--out", str(out)]) == 0
    return out


def _behaviors(mind_dir=MIND):
    return [line.split("\t") for line in (mind_dir / "behaviors.tsv").read_text().splitlines()]


def _news(mind_dir=MIND):
    return [line.split("\t") for line in (mind_dir / "news.tsv").read_text().splitlines()]


# --- determinism and the committed files ------------------------------------------------------

def test_committed_files_are_what_make_samples_writes(script_output):
    for name in SAMPLE_FILES:
        assert (DATA / name).read_bytes() == (script_output / name).read_bytes(), (
            f"data/{name} differs from the generator's output: run `python data/make_samples.py`")


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, script_output):
    again = write_samples(tmp_path / "again", seed=DEFAULT_SEED)
    other = write_samples(tmp_path / "other", seed=DEFAULT_SEED + 1)
    for name, a, b in zip(SAMPLE_FILES, again, other):
        assert a.read_bytes() == (script_output / name).read_bytes(), name
        assert b.read_bytes() != a.read_bytes(), name


def test_script_docstring_gives_its_command():
    assert "python data/make_samples.py" in _load_script().__doc__


def test_files_are_small_ascii():
    for name in SAMPLE_FILES:
        data = (DATA / name).read_bytes()
        assert 0 < len(data) < 1_000_000, name
        data.decode("ascii")  # raises on anything else
        assert b"\r" not in data, name


# --- MIND -------------------------------------------------------------------------------------

def test_news_rows_have_mind_columns_and_topical_titles():
    rows = _news()
    assert 300 <= len(rows) <= 500
    ids = [r[0] for r in rows]
    assert len(set(ids)) == len(ids)
    fillers = set(synthetic_mind._PREFIXES) | set(synthetic_mind._LINKS)
    categories = set()
    for row in rows:
        assert len(row) == 8, row
        news_id, category, subcategory, title, abstract, url, title_entities, abstract_entities = row
        assert re.fullmatch(r"N\d+", news_id)
        assert subcategory in TOPICS[category][0].split()
        assert url.startswith("https://example.com/") and title_entities == abstract_entities == "[]"
        assert abstract and '"' not in title  # TALLRec prompts quote titles
        words = title.lower().split()
        assert 4 <= len(words) <= 8, title
        topical = {w for part in TOPICS[category][1:] for w in part.split()}
        assert set(words) - fillers <= topical, title
        assert len(set(words) & topical) >= 3, title
        categories.add(category)
    assert len(categories) == 8


def test_behaviors_rows_have_mind_columns_and_labels():
    rows = _behaviors()
    news_ids = {r[0] for r in _news()}
    assert 2800 <= len(rows) <= 3200
    assert [r[0] for r in rows] == [str(i) for i in range(1, len(rows) + 1)]
    times, users, lengths = [], set(), []
    for row in rows:
        assert len(row) == 5, row
        _, user, time, history, impressions = row
        assert re.fullmatch(r"U\d+", user)
        assert re.fullmatch(r"\d\d/\d\d/\d{4} \d\d:\d\d:\d\d [AP]M", time), time
        times.append(datetime.strptime(time, "%m/%d/%Y %I:%M:%S %p"))
        assert all(re.fullmatch(r"N\d+", n) and n in news_ids for n in history.split())
        tokens = impressions.split()
        assert all(re.fullmatch(r"N\d+-[01]", t) and t[:-2] in news_ids for t in tokens), impressions
        assert len({t[:-2] for t in tokens}) == len(tokens)  # no news shown twice in one row
        users.add(user)
        lengths.append(len(tokens))
    assert times == sorted(times)
    assert 250 <= len(users) <= 300
    lengths = np.array(lengths)
    assert lengths.max() <= 12 and lengths.min() >= 1
    assert 0.005 < (lengths < 5).mean() < 0.1  # a few rows the converters skip
    assert any(r[3] == "" for r in rows)  # some users have no history


def test_target_positive_rate_in_range():
    targets = [r[4].split()[-1] for r in _behaviors() if len(r[4].split()) >= 5]
    rate = np.mean([t.endswith("-1") for t in targets])
    assert 0.35 <= rate <= 0.55


def test_signal_report_on_committed_sample():
    report = mind_signal_report(MIND)
    assert report["rows"] == sum(len(r[4].split()) >= 5 for r in _behaviors())
    assert report["history_category_auc"] > 0.8
    assert report["title_overlap_auc"] > 0.8
    # Personalisation carries most of the signal; topic popularity a smaller part of it.
    for target_only in ("target_category_auc", "target_news_auc"):
        assert 0.6 < report[target_only] < 0.75
        assert report["history_category_auc"] > report[target_only] + 0.1
        assert report["title_overlap_auc"] > report[target_only] + 0.1
    assert 0.35 <= report["target_positive_rate"] <= 0.55


def test_signal_report_sees_no_signal_when_clicks_are_shuffled(tmp_path):
    rng = np.random.default_rng(0)
    lines = []
    for row in _behaviors():
        tokens = row[4].split()
        labels = rng.permutation([t[-1] for t in tokens])  # same rate, no relation to the user
        row[4] = " ".join(t[:-1] + label for t, label in zip(tokens, labels))
        lines.append("\t".join(row) + "\n")
    (tmp_path / "behaviors.tsv").write_text("".join(lines))
    (tmp_path / "news.tsv").write_bytes((MIND / "news.tsv").read_bytes())
    report = mind_signal_report(tmp_path)
    assert abs(report["history_category_auc_all"] - 0.5) < 0.06
    assert abs(report["title_overlap_auc_all"] - 0.5) < 0.06


def test_roc_auc_counts_ties_as_half():
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert roc_auc([1, 1, 0], [1, 0, 0]) == 0.75
    assert roc_auc([3, 2, 1], [0, 0, 1]) == 0.0
    assert np.isnan(roc_auc([1, 2], [1, 1]))


# --- instruction, preference, opposing and product rows ----------------------------------------

CAPITALS = dict(synthetic.COUNTRIES)


def _expected_output(instruction, text):
    """Recompute the answer of every task the generator knows; None if not recognised."""
    words = text.split()
    simple = {
        "Reverse the order of these words.": lambda: " ".join(words[::-1]),
        "Sort these numbers from smallest to largest.": lambda: ", ".join(
            str(n) for n in sorted(int(x) for x in text.split(", "))),
        "Convert this text to uppercase.": lambda: text.upper(),
        "Give the capital of the country.": lambda: CAPITALS[text],
        "Add these two numbers.": lambda: str(int(words[0]) + int(words[2])),
        "Count the words in this text.": lambda: str(len(words)),
        "Give the first letter of each word.": lambda: " ".join(w[0] for w in words),
    }
    if instruction in simple:
        return simple[instruction]()
    if instruction.startswith("Classify the sentiment"):
        return "Positive" if any(a in text for a in synthetic._REVIEW["Positive"][0]) else "Negative"
    if m := re.fullmatch(r"What is the capital of (.+)\?", instruction):
        return f"The capital of {m[1]} is {CAPITALS[m[1]]}."
    if m := re.fullmatch(r"What is (\d+) (plus|minus|times) (\d+)\?", instruction):
        a, b = int(m[1]), int(m[3])
        value = {"plus": a + b, "minus": a - b, "times": a * b}[m[2]]
        return f"{a} {m[2]} {b} is {value}."
    if m := re.fullmatch(r"What is the opposite of (\w+)\?", instruction):
        pairs = dict(synthetic.ANTONYMS) | {b: a for a, b in synthetic.ANTONYMS}
        return f"The opposite of {m[1]} is {pairs[m[1]]}."
    if m := re.fullmatch(r"Count from (\d+) to (\d+)\.", instruction):
        return ", ".join(str(x) for x in range(int(m[1]), int(m[2]) + 1))
    if m := re.fullmatch(r"Spell the word (\w+) backwards\.", instruction):
        return m[1][::-1]
    return None


def test_alpaca_rows_are_correct_and_short():
    rows = json.loads((DATA / "alpaca-sample.json").read_text())
    assert 350 <= len(rows) <= 450
    assert 0.28 <= np.mean([r["input"] == "" for r in rows]) <= 0.38
    assert len({(r["instruction"], r["input"]) for r in rows}) == len(rows)
    for row in rows:
        assert set(row) == {"instruction", "input", "output"}
        assert 0 < len(row["output"].split()) < 30
        assert row["output"] == _expected_output(row["instruction"], row["input"]), row
    assert len({r["instruction"] for r in rows if r["input"]}) == 8  # every task with input occurs


def test_preference_rows_prefer_correct_polite_answers():
    rows = [json.loads(line) for line in (DATA / "preference-sample.jsonl").read_text().splitlines()]
    assert 250 <= len(rows) <= 350
    assert len({r["prompt"] for r in rows}) == len(rows)
    for row in rows:
        assert set(row) == {"prompt", "chosen", "rejected"}
        expected = _expected_output(row["prompt"], "")
        assert expected is not None, row
        assert row["chosen"].endswith(expected[1:]) and row["chosen"].endswith("."), row
        wrong = not row["rejected"].rstrip(".").endswith(expected[1:-1])
        rude = not row["rejected"].endswith(".")
        assert wrong or rude, row


def test_opposing_rows():
    train = json.loads((DATA / "opposing-sample.json").read_text())
    test = json.loads((DATA / "opposing-test.json").read_text())
    assert len(train) == 50 and len(test) == 10
    assert all(set(r) == {"id", "prompt", "support", "oppose"} for r in train)
    assert all(set(r) == {"id", "prompt"} for r in test)
    assert len({r["id"] for r in train + test}) == 60
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    for row in train:
        assert row["prompt"].endswith("?") and row["support"] != row["oppose"]
        assert row["support"].split(".")[0] in ("Yes", "I agree", "Absolutely")
        assert row["oppose"].split(".")[0] in ("No", "I disagree", "Not really")


def test_products_csv_description_is_a_template_over_the_fields():
    text = (DATA / "products.csv").read_text()
    assert text.startswith("category,name,features,color,description\n")
    rows = list(csv.DictReader(text.splitlines()))
    assert 280 <= len(rows) <= 320
    assert len({r["name"] for r in rows}) == len(rows)
    assert sum("," in r["features"] for r in rows) > len(rows) // 2
    for row in rows:
        use, types, _ = synthetic.PRODUCT_CATEGORIES[row["category"]]
        kind = next(t for t in types if row["name"].endswith(t.title()))
        features = row["features"].split(", ")
        listed = ", ".join(features[:-1]) + " and " + features[-1]
        assert row["description"] == (
            f"The {row['name']} is a {row['color']} {kind} with {listed}, made for {use}.")
