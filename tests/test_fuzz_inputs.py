"""Generated hostile input for config building and the data readers: thousands of --set values,
recipes and rows. Every outcome is a success or a UserError (one line), never another exception,
and a run that fails on its data leaves no run folder behind. Derandomized: CI sees the same cases."""

import dataclasses
import json
import typing
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlxft.cli import cli
from mlxft.config import RunConfig, load_config
from mlxft.data.dataset import encode_preference_split, encode_split, load_preference_splits, load_splits
from mlxft.errors import UserError
from mlxft.train import runs


def fuzz(examples: int):
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def setting_keys(cls=RunConfig, prefix=""):
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            yield from setting_keys(hint, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}"


KEYS = sorted(setting_keys()) + ["train", "data", "trian.steps", "train.steps.x", "builtin_model.train.steps", ""]
TRICKY = ["", "null", "~", "-1", "0", "1e999", ".nan", "-.inf", "[", "[1, 2", "{a: 1}", "a: b", "Q: {q}", "'", '"',
          "!!python/object:os.system", "&a [*a]", "yes", "1_000", "0x10", "[0, -1]", "[[1]]", "1e-3", "2.5", "-0.0",
          "\x00", "\t", "é", "{", "}", "%", "@", "`", "|\n  block", "- a\n- b", "!!binary aGk=", "2**64", "9" * 400]
VALUES = st.one_of(st.sampled_from(TRICKY), st.text(max_size=40),
                   st.integers().map(str), st.floats(allow_nan=True, allow_infinity=True).map(str))


def user_error_or_success(call):
    try:
        return call()
    except UserError as e:
        assert "Traceback" not in str(e), str(e)
        return e


@pytest.mark.slow
@fuzz(1500)
@given(st.lists(st.tuples(st.sampled_from(KEYS), VALUES), min_size=1, max_size=4))
def test_set_values_build_a_config_or_say_why(overrides):
    user_error_or_success(lambda: load_config("tallrec", [f"{k}={v}" for k, v in overrides]))


YAML_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20))
YAML_VALUES = st.recursive(YAML_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                                 st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                           max_leaves=8)
SECTIONS = ["model", "data", "lora", "train", "eval", "dpo", "builtin_model", "recipe", "out", "extra"]


@pytest.mark.slow
@fuzz(500)
@given(st.dictionaries(st.sampled_from(SECTIONS),
                       st.one_of(YAML_VALUES, st.dictionaries(st.sampled_from([k.split(".")[-1] for k in KEYS] + ["train.steps"]),
                                                              YAML_VALUES, max_size=4)), max_size=5))
def test_recipes_build_a_config_or_say_why(tmp_path_factory, recipe):
    path = tmp_path_factory.mktemp("recipe") / "r.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True))
    user_error_or_success(lambda: load_config(str(path)))


FIELDS = ["instruction", "input", "output", "prompt", "completion", "text", "messages", "chosen", "rejected",
          "system", "support", "oppose", "features", "role", "content"]
JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=30)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(FIELDS), inner, max_size=3)),
    max_leaves=6)
MESSAGES = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "bot"]),
                                           "content": st.one_of(st.text(max_size=20), st.integers())}), max_size=3)
ROWS = st.lists(st.dictionaries(st.sampled_from(FIELDS), st.one_of(JSON_VALUES, MESSAGES), max_size=5), min_size=1, max_size=6)
RAW = st.one_of(st.binary(max_size=200), st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")))


def write_rows(folder: Path, kind: str, rows, raw: bytes) -> Path:
    if kind == "jsonl":
        path = folder / "rows.jsonl"
        path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in rows) + raw)
    elif kind == "json":
        path = folder / "rows.json"
        path.write_bytes(json.dumps(rows).encode() if not raw else raw)
    elif kind == "csv":
        path = folder / "rows.csv"
        columns = sorted({k for r in rows for k in r}) or ["text"]
        lines = [",".join(columns)] + [",".join(json.dumps(r.get(c, "")).replace(",", " ") for c in columns) for r in rows]
        path.write_bytes("\n".join(lines).encode() + raw)
    else:
        path = folder / "rows.jsonl"
        path.write_bytes(raw)
    return path


@pytest.mark.slow
@fuzz(600)
@given(kind=st.sampled_from(["jsonl", "json", "csv", "raw"]), rows=ROWS, raw=RAW,
       template=st.sampled_from(["auto", "alpaca", "phi3", "chat", "plain", "{instruction} {features}", "{", "{0}", "{a.b}"]),
       method=st.sampled_from(["sft", "dpo"]))
def test_rows_encode_or_say_why_and_leave_no_run_folder(tmp_path_factory, char_tokenizer, kind, rows, raw, template, method):
    folder = tmp_path_factory.mktemp("rows")
    path = write_rows(folder, kind, rows, raw)
    config = load_config("tallrec" if method == "sft" else "dpo",
                         [f"data.source={path}", f"data.template={template}", f"out={folder / 'run'}", "data.cutoff=64"])

    def run():
        with runs.start(config) as (config_, _):
            if method == "sft":
                splits = load_splits(config_.data)
                for part in (splits.train, splits.valid):
                    if part:
                        encode_split(part, splits, char_tokenizer, config_.data)
            else:
                splits = load_preference_splits(config_.data, config_.dpo.support_ratio)
                encode_preference_split(splits.train, splits, char_tokenizer, config_.data, config_.dpo)

    outcome = user_error_or_success(run)
    if isinstance(outcome, UserError):
        assert not (folder / "run").exists(), str(outcome)


@fuzz(150)
@given(st.lists(st.tuples(st.sampled_from(KEYS), VALUES), min_size=1, max_size=3))
def test_the_cli_stops_on_a_bad_setting_in_one_line_and_makes_no_folder(tmp_path_factory, overrides):
    settings_ = [f"{k}={v}" for k, v in overrides]
    try:
        load_config("tallrec", settings_)
        return  # a valid config would start training: not what this test is about
    except UserError:
        pass
    out = tmp_path_factory.mktemp("cli") / "run"
    args = ["lora", "--recipe", "tallrec", "--out", str(out)] + [a for s in settings_ for a in ("--set", s)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and result.output.startswith("error: "), result.output
    assert len(result.output.strip().splitlines()) == 1 and not out.exists()
