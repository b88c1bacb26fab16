import json

import numpy as np
import pytest

from mlxft.data.sources.mind import ConvertStats, convert_mind, iter_tallrec_rows
from mlxft.errors import UserError

INSTRUCTION = (
    "Given the user's preference and unpreference, identify whether the user will like the "
    'target news by answering "Yes." or "No."'
)

NEWS = [
    ("N1", "sports", "football", "Team A wins the cup"),
    ("N2", "weather", "forecast", "Rain expected all week"),
    ("N3", "finance", "markets", "Markets rally again"),
    ("N4", "tech", "phones", "New phone launched"),
    ("N5", "food", "recipes", "Chef's five-minute pasta"),
    ("N6", "news", "politics", "Election results are in"),
    ("N7", "lifestyle", "travel", "Old trip to Rome"),
    ("N8", "lifestyle", "travel", "Older trip to Paris"),
]

BEHAVIORS = [
    # all liked
    ("1", "U1", "11/11/2019 9:05:58 AM", "", "N1-1 N2-1 N3-1 N4-1 N5-1"),
    # all disliked
    ("2", "U2", "11/12/2019 1:00:00 PM", "", "N1-0 N2-0 N3-0 N4-0 N6-0"),
    # too few impressions
    ("3", "U3", "11/12/2019 2:00:00 PM", "N7", "N1-1 N2-0 N3-1"),
    # mixed
    ("4", "U4", "11/13/2019 3:30:00 AM", "", "N1-1 N2-0 N3-1 N4-0 N5-0 N6-1"),
    # has a History column
    ("5", "U5", "11/14/2019 11:59:59 PM", "N7 N8", "N1-0 N2-1 N3-0 N4-1 N5-0"),
]


def news_line(news_id, category, subcategory, title):
    return "\t".join([news_id, category, subcategory, title, "An abstract.", "https://x/" + news_id, "[]", "[]"])


def write_mind(folder, behaviors=BEHAVIORS, news=NEWS):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "news.tsv").write_text("".join(news_line(*n) + "\n" for n in news), encoding="utf-8")
    (folder / "behaviors.tsv").write_text("".join("\t".join(b) + "\n" for b in behaviors), encoding="utf-8")
    return folder


def row(impression_id, user_id, input_text, output):
    return {
        "instruction": INSTRUCTION,
        "input": input_text,
        "output": output,
        "impression_id": impression_id,
        "user_id": user_id,
    }


EXPECTED = [
    row(
        "1",
        "U1",
        'User Preference: "Team A wins the cup","Rain expected all week","Markets rally again","New phone launched"\n'
        "User Unpreference: \n"
        'Whether the user will like the target news "Chef\'s five-minute pasta"?',
        "Yes.",
    ),
    row(
        "2",
        "U2",
        "User Preference: \n"
        'User Unpreference: "Team A wins the cup","Rain expected all week","Markets rally again","New phone launched"\n'
        'Whether the user will like the target news "Election results are in"?',
        "No.",
    ),
    row(
        "4",
        "U4",
        'User Preference: "Team A wins the cup","Markets rally again"\n'
        'User Unpreference: "Rain expected all week","New phone launched","Chef\'s five-minute pasta"\n'
        'Whether the user will like the target news "Election results are in"?',
        "Yes.",
    ),
    row(
        "5",
        "U5",
        'User Preference: "Rain expected all week","New phone launched"\n'
        'User Unpreference: "Team A wins the cup","Markets rally again"\n'
        'Whether the user will like the target news "Chef\'s five-minute pasta"?',
        "No.",
    ),
]


def test_rows_are_exact_and_few_impressions_are_skipped(tmp_path):
    stats = ConvertStats()
    rows = list(iter_tallrec_rows(write_mind(tmp_path / "mind"), stats=stats))
    assert rows == EXPECTED
    assert (stats.rows_read, stats.rows_written, stats.skipped_few_impressions) == (5, 4, 1)
    assert (stats.yes, stats.no) == (2, 2)


def test_min_impressions_lowered_keeps_the_short_row(tmp_path):
    stats = ConvertStats()
    rows = list(iter_tallrec_rows(write_mind(tmp_path / "mind"), min_impressions=3, stats=stats))
    assert [r["impression_id"] for r in rows] == ["1", "2", "3", "4", "5"]
    assert rows[2]["input"] == (
        'User Preference: "Team A wins the cup"\n'
        'User Unpreference: "Rain expected all week"\n'
        'Whether the user will like the target news "Markets rally again"?'
    )
    assert rows[2]["output"] == "Yes."
    assert stats.skipped_few_impressions == 0


def test_use_history_adds_older_liked_titles_first(tmp_path):
    rows = list(iter_tallrec_rows(write_mind(tmp_path / "mind"), use_history=True))
    assert rows[3]["input"] == (
        'User Preference: "Old trip to Rome","Older trip to Paris","Rain expected all week","New phone launched"\n'
        'User Unpreference: "Team A wins the cup","Markets rally again"\n'
        'Whether the user will like the target news "Chef\'s five-minute pasta"?'
    )
    # Rows without history are unchanged.
    assert rows[:3] == EXPECTED[:3]


def test_max_history_keeps_the_most_recent_items(tmp_path):
    mind = write_mind(tmp_path / "mind")
    rows = list(iter_tallrec_rows(mind, max_history=2))
    # U4 saw N1+ N2- N3+ N4- N5- before the target: the last two are both disliked.
    assert rows[2]["input"] == (
        "User Preference: \n"
        'User Unpreference: "New phone launched","Chef\'s five-minute pasta"\n'
        'Whether the user will like the target news "Election results are in"?'
    )
    assert rows[2]["output"] == "Yes."

    none_shown = list(iter_tallrec_rows(mind, max_history=0))
    assert none_shown[0]["input"] == (
        "User Preference: \nUser Unpreference: \n"
        'Whether the user will like the target news "Chef\'s five-minute pasta"?'
    )

    # A cap larger than the history changes nothing: far larger, and larger by less than the
    # history's length (U4's 5 titles under a cap of 6 or 9 kept only the last 4 or 1, until fixed).
    assert list(iter_tallrec_rows(mind, max_history=100)) == EXPECTED
    assert list(iter_tallrec_rows(mind, max_history=6)) == EXPECTED
    assert list(iter_tallrec_rows(mind, max_history=9)) == EXPECTED


def test_max_history_counts_history_and_impressions_together(tmp_path):
    rows = list(iter_tallrec_rows(write_mind(tmp_path / "mind"), use_history=True, max_history=5))
    # N7+ N8+ N1- N2+ N3- N4+ -> the oldest (N7, from History) is dropped.
    assert rows[3]["input"] == (
        'User Preference: "Older trip to Paris","Rain expected all week","New phone launched"\n'
        'User Unpreference: "Team A wins the cup","Markets rally again"\n'
        'Whether the user will like the target news "Chef\'s five-minute pasta"?'
    )
    rows = list(iter_tallrec_rows(write_mind(tmp_path / "mind"), use_history=True, max_history=3))
    assert rows[3]["input"] == (
        'User Preference: "Rain expected all week","New phone launched"\n'
        'User Unpreference: "Markets rally again"\n'
        'Whether the user will like the target news "Chef\'s five-minute pasta"?'
    )


def test_rows_stream_before_the_rest_of_the_file_is_read(tmp_path):
    behaviors = BEHAVIORS[:1] + [("9", "U9", "11/11/2019 9:05:58 AM", "", "N1-7")]
    rows = iter_tallrec_rows(write_mind(tmp_path / "mind", behaviors=behaviors))
    assert next(rows) == EXPECTED[0]
    with pytest.raises(UserError, match=r"behaviors\.tsv:2"):
        next(rows)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_convert_writes_every_row_to_exactly_one_split(tmp_path):
    out = tmp_path / "out" / "nested"
    stats = convert_mind(write_mind(tmp_path / "mind"), out, fractions=(0.5, 0.25, 0.25), seed=3)
    splits = {name: read_jsonl(out / f"{name}.jsonl") for name in ("train", "valid", "test")}
    written = sorted(splits["train"] + splits["valid"] + splits["test"], key=lambda r: r["impression_id"])
    assert written == EXPECTED
    assert (stats.train, stats.valid, stats.test) == tuple(len(splits[n]) for n in ("train", "valid", "test"))
    assert stats.rows_written == 4 and stats.skipped_few_impressions == 1
    assert sorted(p.name for p in out.iterdir()) == ["test.jsonl", "train.jsonl", "valid.jsonl"]


def test_convert_passes_options_through(tmp_path):
    out = tmp_path / "out"
    stats = convert_mind(write_mind(tmp_path / "mind"), out, fractions=(1, 0, 0), min_impressions=3, max_history=0)
    train = read_jsonl(out / "train.jsonl")
    assert len(train) == 5 and stats.train == 5
    assert all(r["input"].startswith("User Preference: \nUser Unpreference: \n") for r in train)
    assert (out / "valid.jsonl").read_text() == "" and (out / "test.jsonl").read_text() == ""


def big_mind(folder, n_rows=2000, seed=7):
    rng = np.random.default_rng(seed)
    behaviors = []
    for i in range(n_rows):
        labels = rng.integers(0, 2, size=5)
        ids = rng.integers(1, 9, size=5)
        impressions = " ".join(f"N{n}-{y}" for n, y in zip(ids, labels))
        behaviors.append((str(i + 1), f"U{i}", "11/11/2019 9:05:58 AM", "", impressions))
    return write_mind(folder, behaviors=behaviors)


def test_split_is_deterministic_and_follows_fractions(tmp_path):
    mind = big_mind(tmp_path / "mind")
    fractions = (0.85, 0.10, 0.05)
    convert_mind(mind, tmp_path / "a", fractions=fractions, seed=0)
    stats = convert_mind(mind, tmp_path / "b", fractions=fractions, seed=0)
    convert_mind(mind, tmp_path / "c", fractions=fractions, seed=1)
    for name in ("train", "valid", "test"):
        assert (tmp_path / "a" / f"{name}.jsonl").read_bytes() == (tmp_path / "b" / f"{name}.jsonl").read_bytes()
    assert (tmp_path / "a" / "train.jsonl").read_bytes() != (tmp_path / "c" / "train.jsonl").read_bytes()

    assert stats.rows_written == 2000
    assert stats.train + stats.valid + stats.test == 2000
    assert abs(stats.train - 1700) < 80
    assert abs(stats.valid - 200) < 50
    assert abs(stats.test - 100) < 40

    # The documented rule: one uniform draw per row, in file order.
    draws = np.random.default_rng(0).random(2000)
    expected = np.where(draws < 0.85, "train", np.where(draws < 0.95, "valid", "test"))
    got = {}
    for name in ("train", "valid", "test"):
        for r in read_jsonl(tmp_path / "a" / f"{name}.jsonl"):
            got[int(r["impression_id"]) - 1] = name
    assert [got[i] for i in range(2000)] == list(expected)


def test_failure_leaves_no_half_written_split(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "train.jsonl").write_text("old\n")
    behaviors = BEHAVIORS + [("6", "U6", "11/11/2019 9:05:58 AM", "", "N1-1 N2-1 N3-1 N4-1 N99-1")]
    with pytest.raises(UserError, match="N99"):
        convert_mind(write_mind(tmp_path / "mind", behaviors=behaviors), out)
    assert sorted(p.name for p in out.iterdir()) == ["train.jsonl"]
    assert (out / "train.jsonl").read_text() == "old\n"


def one_line_error(call):
    with pytest.raises(UserError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_folder_and_files(tmp_path):
    message = one_line_error(lambda: list(iter_tallrec_rows(tmp_path / "nope")))
    assert "nope" in message and "no such folder" in message

    mind = write_mind(tmp_path / "mind")
    (mind / "news.tsv").unlink()
    message = one_line_error(lambda: list(iter_tallrec_rows(mind)))
    assert "no news.tsv" in message

    mind = write_mind(tmp_path / "mind2")
    (mind / "behaviors.tsv").unlink()
    message = one_line_error(lambda: list(iter_tallrec_rows(mind)))
    assert "no behaviors.tsv" in message


def test_behaviors_row_with_wrong_column_count(tmp_path):
    mind = write_mind(tmp_path / "mind")
    lines = (mind / "behaviors.tsv").read_text().splitlines()
    lines[1] = "2\tU2\t11/12/2019 1:00:00 PM\tN1-0 N2-0 N3-0 N4-0 N6-0"  # history column dropped
    (mind / "behaviors.tsv").write_text("\n".join(lines) + "\n")
    message = one_line_error(lambda: list(iter_tallrec_rows(mind)))
    assert f"{mind / 'behaviors.tsv'}:2:" in message and "4" in message


@pytest.mark.parametrize("token", ["N1-2", "N1", "-1", "N1-yes"])
def test_bad_impression_token(tmp_path, token):
    behaviors = BEHAVIORS[:2] + [("3", "U3", "11/12/2019 2:00:00 PM", "", f"N1-1 N2-0 {token} N4-1 N5-1")]
    mind = write_mind(tmp_path / "mind", behaviors=behaviors)
    message = one_line_error(lambda: list(iter_tallrec_rows(mind)))
    assert f"{mind / 'behaviors.tsv'}:3:" in message and f"'{token}'" in message


def test_malformed_news_row(tmp_path):
    mind = write_mind(tmp_path / "mind")
    lines = (mind / "news.tsv").read_text().splitlines()
    lines[1] = "N2\tweather\tforecast"
    (mind / "news.tsv").write_text("\n".join(lines) + "\n")
    message = one_line_error(lambda: list(iter_tallrec_rows(mind)))
    assert f"{mind / 'news.tsv'}:2:" in message


def test_unknown_news_id(tmp_path):
    behaviors = BEHAVIORS[:1] + [("2", "U2", "11/12/2019 1:00:00 PM", "", "N1-0 N2-0 N42-0 N4-0 N6-0")]
    mind = write_mind(tmp_path / "mind", behaviors=behaviors)
    message = one_line_error(lambda: list(iter_tallrec_rows(mind)))
    assert f"{mind / 'behaviors.tsv'}:2:" in message and "N42" in message


def test_unknown_history_id_only_matters_when_history_is_used(tmp_path):
    behaviors = BEHAVIORS[:2] + [("3", "U3", "11/12/2019 2:00:00 PM", "N77", "N1-1 N2-0 N3-1 N4-1 N5-1")]
    mind = write_mind(tmp_path / "mind", behaviors=behaviors)
    assert len(list(iter_tallrec_rows(mind))) == 3
    message = one_line_error(lambda: list(iter_tallrec_rows(mind, use_history=True)))
    assert f"{mind / 'behaviors.tsv'}:3:" in message and "N77" in message


def test_folder_with_no_usable_rows(tmp_path):
    behaviors = [BEHAVIORS[2], ("7", "U7", "11/12/2019 2:00:00 PM", "", "N1-1")]
    mind = write_mind(tmp_path / "mind", behaviors=behaviors)
    message = one_line_error(lambda: list(iter_tallrec_rows(mind)))
    assert "no rows" in message and "2 of 2" in message and "fewer than 5 impressions" in message
    out = tmp_path / "out"
    with pytest.raises(UserError, match="no rows"):
        convert_mind(mind, out)
    assert not out.exists()  # an error leaves no empty --out folder behind


def test_news_or_behaviors_not_in_utf8_are_named_with_their_line(tmp_path):
    mind = write_mind(tmp_path / "mind")
    news = (mind / "news.tsv").read_bytes().split(b"\n")
    news[1] = news[1].replace(b"\t", b"\tCaf\xe9 ", 1)
    (mind / "news.tsv").write_bytes(b"\n".join(news))
    message = one_line_error(lambda: convert_mind(mind, tmp_path / "out"))
    assert message.startswith(f"{mind / 'news.tsv'}:2: not UTF-8 text (byte 0xe9")
    assert not (tmp_path / "out").exists()


def test_a_byte_order_mark_on_mind_files_is_accepted(tmp_path):
    plain = list(iter_tallrec_rows(write_mind(tmp_path / "plain")))
    mind = write_mind(tmp_path / "bom")
    for name in ("news.tsv", "behaviors.tsv"):
        (mind / name).write_bytes(b"\xef\xbb\xbf" + (mind / name).read_bytes())
    assert list(iter_tallrec_rows(mind)) == plain
