"""--data hf:NAME[:CONFIG][@SPLIT]: Hugging Face data sets through `datasets`, on folders made here
with `datasets` (offline: HF_DATASETS_OFFLINE=1, set in conftest.py); and data.columns on any source."""

import json
import sys

import pytest
from click.testing import CliRunner

from mlxft.cli import cli
from mlxft.config import load_config
from mlxft.data.dataset import load_preference_splits, load_prompt_splits, load_splits
from mlxft.errors import UserError

datasets = pytest.importorskip("datasets")

QA = [{"question": f"What is {i} + 1?", "answer": f"{i + 1}.", "context": "Count." if i % 2 else None} for i in range(40)]
ALPACA = {"instruction": "question", "output": "answer", "input": "context"}


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A cache of this test's own, offline; `saved` written by DatasetDict.save_to_disk (train +
    validation), `files` a folder of JSONL files load_dataset reads (train + test)."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    datasets.DatasetDict(train=datasets.Dataset.from_list(QA), validation=datasets.Dataset.from_list(QA[:5])).save_to_disk("saved")
    (tmp_path / "files").mkdir()
    for split, rows in (("train", QA), ("test", QA[:4])):
        (tmp_path / "files" / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return tmp_path


def data(source, *settings):
    return load_config(None, [f"data.source={source}", *settings]).data


def test_splits_columns_and_origins(hub):
    columns = "data.columns={instruction: question, output: answer, input: context}"
    own = load_splits(data("hf:saved", columns))  # the data set's own train and validation splits
    assert (len(own.train), len(own.valid), len(own.test), own.schema, own.source) == (40, 5, 0, "alpaca", "hf:saved")
    assert own.train[0].origin == "hf:saved@train row 0" and own.valid[4].origin == "hf:saved@validation row 4"
    assert own.train[0].fields == {"instruction": "What is 0 + 1?", "output": "1."}  # a null is left out, as JSON would
    assert own.train[1].fields == {"instruction": "What is 1 + 1?", "output": "2.", "input": "Count."}
    named = load_splits(data("hf:saved@train", columns, "data.seed=3"))  # one split: split as a file is
    assert (len(named.train), len(named.valid), len(named.test)) == (34, 4, 2)
    assert [r.origin for r in named.train] == [r.origin for r in load_splits(data("hf:saved@train", columns, "data.seed=3")).train]
    assert sorted(int(r.origin.split()[-1]) for r in named.train + named.valid + named.test) == list(range(40))
    files = load_splits(data("hf:files", columns, "data.max_rows=6"))  # load_dataset on a folder: train + test
    assert (len(files.train), len(files.valid), len(files.test)) == (6, 0, 4) and files.test[0].origin == "hf:files@test row 0"
    # the same mapping on a file
    (hub / "qa.jsonl").write_text("".join(json.dumps({k: v for k, v in row.items() if v}) + "\n" for row in QA))
    from_file = load_splits(data(hub / "qa.jsonl", columns, "data.max_rows=10"))
    assert len(from_file.train + from_file.valid + from_file.test) == 10 and from_file.schema == "alpaca"


def test_streaming_reads_only_the_rows_asked_for(hub):
    cache = hub / "cache"
    streamed = load_splits(data("hf:files@train", "data.max_rows=8", "data.columns={prompt: question, completion: answer}"))
    assert len(streamed.train + streamed.valid + streamed.test) == 8 and streamed.schema == "completion"
    assert not list(cache.rglob("*.arrow"))  # streamed: nothing prepared in the cache
    load_splits(data("hf:files@train", "data.max_rows=8", "data.streaming=false", "data.columns={prompt: question, completion: answer}"))
    assert list(cache.rglob("*.arrow"))  # the control: read whole, the split is written to the cache first


def test_preference_and_prompt_rows(hub):
    pairs = [{"prompt": f"Say {i}.", "chosen": f"{i}", "rejected": "no", "system": None} for i in range(12)]
    datasets.Dataset.from_list(pairs).save_to_disk("pairs")
    dpo = load_preference_splits(data("hf:pairs"))  # a Dataset saved alone: one list, split with the fractions
    assert (len(dpo.train), len(dpo.valid), len(dpo.test)) == (10, 1, 1) and "system" not in dpo.train[0].fields
    kto = load_preference_splits(data("hf:pairs"), unpaired=True)  # each pair as two rows
    assert len(kto.train) == 21 and {r["label"] for r in kto.train} == {True, False}
    rl = load_prompt_splits(data("hf:files", "data.columns={prompt: question}"))
    assert (len(rl.train), len(rl.test)) == (40, 4) and rl.train[3]["answer"] == "4."  # other columns stay for rewards


@pytest.mark.parametrize("source, settings, message", [
    ("hf:saved@nope", [], "data hf:saved@nope: no split 'nope'; the splits: train, validation"),
    ("hf:files@nope", [], "data hf:files@nope: no split 'nope'; the splits: train, test"),
    ("hf:files:nope", [], "data hf:files:nope: no config 'nope'; the configs: default"),
    ("hf:saved:nope", [], "data hf:saved:nope: saved was written by save_to_disk, which keeps one config"),
    ("hf:nobody/nothing", [], "data hf:nobody/nothing: no such data set, or it cannot be read here"),
    ("hf:saved", ["data.columns={instruction: query}"],
     "data hf:saved@train: no column 'query' to read 'instruction' from (data.columns); the columns: question, answer, context"),
    ("hf:x:@train", [], "data hf:x:@train: expected hf:NAME[:CONFIG][@SPLIT]"),
])
def test_mistakes_name_what_was_asked_and_what_there_is(hub, source, settings, message):
    with pytest.raises(UserError, match="^" + message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        load_splits(data(source, *settings))


def test_without_datasets_it_says_how_to_get_it(hub, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(UserError, match=r"not installed: pip install 'mlxft\[hub\]'"):
        load_splits(data("hf:saved"))


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_inspect_and_train_from_the_command_line(hub, tiny_model_dir):
    inspected = run("data", "inspect", "hf:saved@train", "--column", "instruction=question", "--column", "output=answer",
                    "--max-rows", "5", "--json")
    assert inspected.exit_code == 0, inspected.output
    info = json.loads(inspected.output)
    assert (info["schema"], info["rows"], info["example"]["origin"]) == ("alpaca", 5, "hf:saved@train row 0")
    trained = run("lora", "--recipe", "alpaca-sft", "--model", tiny_model_dir, "--data", "hf:saved", "--out", hub / "run",
                  "--set", "data.columns={instruction: question, output: answer}", "--set", "train.steps=2",
                  "--set", "train.batch_size=4", "--set", "eval.every=0", "--set", "eval.generate_examples=0", "--backend", "mlx")
    assert trained.exit_code == 0, trained.output
    summary = json.loads((hub / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and "eval_loss" in summary["after"]
