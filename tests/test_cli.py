"""The command line as a user meets it: help texts, one-line errors with exit code 2."""

import json

import pytest
from click.testing import CliRunner

from mlxft.cli import cli


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def help_options(*command):
    """Every --option of a command, and whether each has help text."""
    ctx_command = cli
    for name in command:
        ctx_command = ctx_command.commands[name]
    return {p.opts[0]: bool(p.help) for p in ctx_command.params if p.opts[0].startswith("--")}


@pytest.mark.parametrize("command", [("data", "convert", "mind"), ("data", "inspect"), ("data", "convert", "pairs"), ("data", "split")])
def test_every_option_is_described(command):
    options = help_options(*command)
    undocumented = [o for o, has_help in options.items() if not has_help]
    assert undocumented == []
    result = run(*command, "--help")
    assert result.exit_code == 0
    for option in options:
        assert option in result.output


def test_top_level_help_lists_the_data_commands():
    result = run("--help")
    commands = {line.split()[0] for line in result.output.split("Commands:")[1].splitlines() if line.strip()}
    assert result.exit_code == 0 and {"data", "lora", "dpo", "eval"} <= commands
    assert "convert" in run("data", "--help").output.split("Commands:")[1]


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "name, text, extra, message",
    [
        ("bad.jsonl", '{"text": "a"}\n{"text": \n', [], "bad.jsonl:2: not valid JSON"),
        ("missing.jsonl", '{"instruction": "i", "output": "o"}\n{"instruction": "j"}\n', [], "missing.jsonl:2: missing field 'output'"),
        ("empty.jsonl", "", [], "empty.jsonl: no rows"),
        ("odd.jsonl", '{"question": "q"}\n', [], "odd.jsonl:1: unknown row schema"),
        ("items.csv", "name,color\nLamp,red\n", ["--template", "Features: {features}\nDescription:", "--completion-field", "description"],
         "items.csv:2: no column 'features', 'description'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, name, text, extra, message):
    result = run("data", "inspect", write(tmp_path, name, text), *extra)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_convert_mind_errors_name_the_folder(tmp_path):
    result = run("data", "convert", "mind", tmp_path, "--out", tmp_path / "out")
    assert result.exit_code == 2 and "no behaviors.tsv in this folder" in result.output


def test_split_with_k_shot(tmp_path):
    rows = "".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(100))
    result = run("data", "split", write(tmp_path, "all.jsonl", rows), "--out", tmp_path / "s", "--k-shot", "16", "--seed", "3")
    assert result.exit_code == 0, result.output
    assert "wrote 16 train, 10 valid, 5 test rows" in result.output
    train = (tmp_path / "s" / "train.jsonl").read_text().splitlines()
    again = run("data", "split", tmp_path / "all.jsonl", "--out", tmp_path / "t", "--k-shot", "16", "--seed", "3")
    assert again.exit_code == 0 and (tmp_path / "t" / "train.jsonl").read_text().splitlines() == train


def test_convert_pairs(tmp_path):
    rows = [{"id": i, "prompt": f"p{i}", "support": "yes", "oppose": "no"} for i in range(4)]
    source = write(tmp_path, "op.json", json.dumps(rows))
    result = run("data", "convert", "pairs", source, "--out", tmp_path / "pairs.jsonl", "--support-ratio", "0.25")
    assert result.exit_code == 0, result.output
    pairs = [json.loads(line) for line in (tmp_path / "pairs.jsonl").read_text().splitlines()]
    assert [p["chosen"] for p in pairs] == ["yes", "no", "no", "no"]
    bad = run("data", "convert", "pairs", source, "--out", tmp_path / "x.jsonl", "--support-ratio", "2")
    assert bad.exit_code == 2 and "Traceback" not in bad.output


def test_inspect_bundled_mind_sample(builtin_tokenizer):
    from mlxft.resources import bundled

    result = run("data", "inspect", bundled("data/mind-sample"), "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["schema"] == "alpaca" and info["template"] == "alpaca"
    assert info["labels"] == {"No.": 1732, "Yes.": 1190}
    assert info["rows"] == 2922 and info["truncated"] == 0
    assert info["supervised"]["max"] == 3  # "▁Yes" / "▁No", ".", EOS
    assert info["example"]["mask_runs"].endswith(" 1x3") and info["example"]["mask_runs"].startswith("0x")


def test_inspect_csv_through_a_format_string(builtin_tokenizer):
    from mlxft.resources import bundled

    template = "Generate a product description for the following item:\nFeatures: {features}\n\nDescription:"
    result = run("data", "inspect", bundled("data/products.csv"), "--template", template,
                 "--completion-field", "description", "--cutoff", "70")
    assert result.exit_code == 0, result.output
    assert "schema:    columns" in result.output
    assert "Features: " in result.output
    truncated = int(result.output.split("(truncated): ")[1].split()[0])
    assert truncated > 0  # a 70-token cutoff must cut some descriptions, and say so


def test_inspect_shows_each_scored_turn_of_a_conversation(builtin_tokenizer, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]},
            {"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."},
                          {"role": "user", "content": "And of Germany?"}, {"role": "assistant", "content": "Berlin."}]}]
    source = tmp_path / "chat.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run("data", "inspect", source)
    assert result.exit_code == 0, result.output
    shown = result.output.split("example (")[1]
    assert shown.startswith(f"{source}:2)")  # the row with the most scored turns
    assert shown.count("--- scored ---") == 2 and "'Paris.<|end|>\\n'" in shown and "'Berlin.<|end|>\\n</s>'" in shown


def test_outputs_that_name_the_wrong_kind_of_path_are_one_line_errors(tmp_path):
    (tmp_path / "file").write_text("x")
    (tmp_path / "folder").mkdir()
    cases = [
        (("data", "split", "data/alpaca-sample.json", "--out", tmp_path / "file"), "file: file exists"),
        (("data", "convert", "pairs", "data/opposing-sample.json", "--out", tmp_path / "folder", "--support-ratio", "0.5"),
         "folder: is a folder; name a file to write"),
        (("data", "convert", "mind", "data/mind-sample", "--out", tmp_path / "file"), "file: is a file; name a folder"),
    ]
    for args, message in cases:
        result = run(*args)
        assert result.exit_code == 2 and message in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert (tmp_path / "file").read_text() == "x" and not any((tmp_path / "folder").iterdir())
