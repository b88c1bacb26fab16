import json

import pytest

from mlxft.data.records import load_records, write_jsonl
from mlxft.data.sources.pairs import opposing_to_preference
from mlxft.errors import UserError

ROWS = [
    {"id": 1, "prompt": "Cats or dogs?", "support": "Cats.", "oppose": "Dogs."},
    {"id": 2, "prompt": "Tea or coffee?", "support": "Tea.", "oppose": "Coffee."},
    {"id": 3, "prompt": "Sea or mountains?", "support": "Sea.", "oppose": "Mountains."},
    {"id": 4, "prompt": "Summer or winter?", "support": "Summer.", "oppose": "Winter."},
]


def records(tmp_path, rows=ROWS):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_records(path)


def test_half_support(tmp_path):
    assert opposing_to_preference(records(tmp_path), 0.5) == [
        {"prompt": "Cats or dogs?", "chosen": "Cats.", "rejected": "Dogs.", "id": 1},
        {"prompt": "Tea or coffee?", "chosen": "Tea.", "rejected": "Coffee.", "id": 2},
        {"prompt": "Sea or mountains?", "chosen": "Mountains.", "rejected": "Sea.", "id": 3},
        {"prompt": "Summer or winter?", "chosen": "Winter.", "rejected": "Summer.", "id": 4},
    ]


def test_all_oppose_and_all_support(tmp_path):
    rows = opposing_to_preference(records(tmp_path), 0)
    assert [(r["chosen"], r["rejected"]) for r in rows] == [
        ("Dogs.", "Cats."), ("Coffee.", "Tea."), ("Mountains.", "Sea."), ("Winter.", "Summer.")
    ]
    rows = opposing_to_preference(records(tmp_path), 1)
    assert [(r["chosen"], r["rejected"]) for r in rows] == [
        ("Cats.", "Dogs."), ("Tea.", "Coffee."), ("Sea.", "Mountains."), ("Summer.", "Winter.")
    ]


def test_max_rows_caps_before_the_ratio_is_applied(tmp_path):
    rows = opposing_to_preference(records(tmp_path), 0.5, max_rows=2)
    assert rows == [
        {"prompt": "Cats or dogs?", "chosen": "Cats.", "rejected": "Dogs.", "id": 1},
        {"prompt": "Tea or coffee?", "chosen": "Coffee.", "rejected": "Tea.", "id": 2},
    ]
    assert len(opposing_to_preference(records(tmp_path), 0.5, max_rows=10)) == 4


def test_ratio_rounds_to_the_nearest_row(tmp_path):
    rows = opposing_to_preference(records(tmp_path), 0.7)  # 2.8 -> 3 support rows
    assert [r["chosen"] for r in rows] == ["Cats.", "Tea.", "Sea.", "Winter."]


@pytest.mark.parametrize("ratio", [-0.1, 1.5, float("nan"), "0.5", True])
def test_bad_ratio(tmp_path, ratio):
    with pytest.raises(UserError, match="support_ratio"):
        opposing_to_preference(records(tmp_path), ratio)


def test_bad_max_rows(tmp_path):
    with pytest.raises(UserError, match="max_rows"):
        opposing_to_preference(records(tmp_path), 0.5, max_rows=0)


def test_missing_field_names_the_record(tmp_path):
    rows = [dict(r) for r in ROWS]
    del rows[2]["oppose"]
    with pytest.raises(UserError) as info:
        opposing_to_preference(records(tmp_path, rows), 0.5)
    assert f"{tmp_path / 'train.jsonl'}:3:" in str(info.value) and "'oppose'" in str(info.value)


def test_custom_field_names_and_no_id(tmp_path):
    rows = [{"question": "Q1", "pro": "A", "con": "B"}, {"question": "Q2", "pro": "C", "con": "D"}]
    out = opposing_to_preference(
        records(tmp_path, rows), 0.5, prompt_field="question", support_field="pro", oppose_field="con"
    )
    assert out == [
        {"prompt": "Q1", "chosen": "A", "rejected": "B"},
        {"prompt": "Q2", "chosen": "D", "rejected": "C"},
    ]


def test_write_jsonl_round_trips_and_leaves_no_temp_file(tmp_path):
    rows = opposing_to_preference(records(tmp_path), 0.5)
    path = tmp_path / "out" / "dpo.jsonl"
    write_jsonl(rows, path)
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows
    assert [p.name for p in path.parent.iterdir()] == ["dpo.jsonl"]
