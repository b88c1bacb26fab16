"""`mlxft lora`, `mlxft eval auc` and `mlxft recipes` as a user meets them."""

import json

import pytest
from click.testing import CliRunner

from mlxft.cli import cli


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line_error(result, message):
    assert result.exit_code == 2, result.output
    assert message in result.output, result.output
    lines = result.output.strip().splitlines()
    assert "Traceback" not in result.output
    assert lines[-1].startswith("error: ") and sum(line.startswith("error: ") for line in lines) == 1


def test_recipes_list_and_show():
    listing = run("recipes")
    assert listing.exit_code == 0
    assert "tallrec" in listing.output and "alpaca-sft" in listing.output and "product-desc" in listing.output
    shown = run("recipes", "show", "tallrec")
    assert shown.exit_code == 0 and shown.output.startswith("# TALLRec") and "mlxft lora --recipe tallrec" in shown.output


@pytest.mark.slow
def test_lora_end_to_end_on_a_tiny_model(tiny_model_dir, tmp_path):
    result = run("lora", "--recipe", "tallrec", "--model", tiny_model_dir, "--out", tmp_path / "run",
                 "--set", "train.steps=3", "--set", "data.k_shot=16", "--set", "data.max_valid_rows=8",
                 "--set", "train.batch_size=4", "--set", "eval.every=0")
    assert result.exit_code == 0, result.output
    assert "validation auc:" in result.output and "validation loss:" in result.output
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 3 and "eval_auc" in summary["before"] and "eval_auc" in summary["after"]
    for key in ("tokens_per_second", "peak_memory_gb", "trained_tokens", "best", "adapter"):
        assert summary[key] is not None, key
    # the adapter it wrote scores through `mlxft eval auc`
    scores = {}
    for adapter in (["--adapter", tmp_path / "run"], []):
        scored = run("eval", "auc", "--model", tiny_model_dir, *adapter, "--data", "data/mind-sample", "--json")
        assert scored.exit_code == 0, scored.output
        scores[bool(adapter)] = json.loads(scored.output)
    assert scores[True]["rows"] == scores[False]["rows"] > 100
    assert abs(scores[True]["loss"] - scores[False]["loss"]) > 1e-5  # the adapter was applied (measured: 2.6e-4; 0 without it)
    # a second run into the same folder is refused, not mixed in
    again = run("lora", "--recipe", "tallrec", "--model", tiny_model_dir, "--out", tmp_path / "run")
    one_line_error(again, "is not empty; use --resume")


@pytest.fixture
def lfs_adapter(tmp_path):
    folder = tmp_path / "lfs"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16,
                                                            "target_modules": ["q_proj"]}))
    (folder / "adapter_model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")
    return folder


def test_adapter_mistakes(tiny_model_dir, tmp_path, lfs_adapter):
    base = ["eval", "auc", "--model", tiny_model_dir, "--data", "data/mind-sample", "--adapter"]
    one_line_error(run(*base, tmp_path / "missing"), "no such folder")
    (tmp_path / "file").write_text("x")
    one_line_error(run(*base, tmp_path / "file"), "is a file")
    (tmp_path / "empty").mkdir()
    one_line_error(run(*base, tmp_path / "empty"), "the folder is empty")
    one_line_error(run(*base, lfs_adapter), "a Git LFS pointer, not the weights")


def test_adapter_for_another_base_names_the_keys(tiny_model_dir, tmp_path):
    import numpy as np

    from mlxft.models.adapters import AdapterSpec, save_adapter

    spec = AdapterSpec(4, 8, 0.0, ["q_proj"], "other")
    save_adapter(tmp_path / "wide", spec, {"model.layers.0.self_attn.q_proj": (np.zeros((4, 64)), np.zeros((64, 4)))})
    result = run("eval", "auc", "--model", tiny_model_dir, "--data", "data/mind-sample", "--adapter", tmp_path / "wide")
    one_line_error(result, "'model.layers.0.self_attn.q_proj' is 32x32 in the model but the adapter is for 64x64")
    save_adapter(tmp_path / "deep", spec, {"model.layers.7.self_attn.q_proj": (np.zeros((4, 32)), np.zeros((32, 4)))})
    result = run("eval", "auc", "--model", tiny_model_dir, "--data", "data/mind-sample", "--adapter", tmp_path / "deep")
    one_line_error(result, "it adapts 'model.layers.7.self_attn.q_proj', which the model lacks")


def test_lora_input_mistakes(tiny_model_dir, tmp_path):
    one_line_error(run("lora", "--recipe", "tallrec", "--set", "train.stepz=3", "--out", tmp_path / "a"),
                   "unknown setting 'train.stepz'")
    no_tokenizer = tmp_path / "bare"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    one_line_error(run("lora", "--recipe", "tallrec", "--model", no_tokenizer, "--out", tmp_path / "b"), "no tokenizer files")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    one_line_error(run("lora", "--recipe", "tallrec", "--model", tiny_model_dir, "--data", empty, "--out", tmp_path / "c"),
                   "empty.jsonl: no rows")
    long_rows = tmp_path / "long.jsonl"
    long_rows.write_text("".join(json.dumps({"prompt": "word " * 50, "completion": "x"}) + "\n" for _ in range(5)))
    one_line_error(run("lora", "--recipe", "tallrec", "--model", tiny_model_dir, "--data", long_rows, "--out", tmp_path / "d",
                       "--set", "data.template=plain", "--set", "data.cutoff=10"), "no usable rows")


SMALL = ["--set", "data.k_shot=16", "--set", "data.max_valid_rows=8", "--set", "train.batch_size=4",
         "--set", "eval.every=0", "--set", "train.report_every=1"]


def steps_and_losses(folder):
    return [(r["step"], r["loss"]) for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_resumed_run_runs_the_config_it_was_started_with(tiny_as_builtin, tmp_path, stop_after_step, method):
    # tallrec's builtin_model section says full fine-tuning, 300 steps, eval every 100; the run
    # chose 6 steps (and, for "lora", an adapter). Resuming used to put the section back.
    chosen = [*SMALL, "--set", "train.steps=6", "--set", "train.checkpoint_every=2", "--backend", "mlx"]
    if method == "lora":
        chosen += ["--set", "lora.full_finetune=false"]
    whole = run("lora", "--recipe", "tallrec", "--out", tmp_path / "whole", *chosen)
    assert whole.exit_code == 0, whole.output
    stop_after_step(3)  # checkpoint at step 2; killed after step 3
    killed = run("lora", "--recipe", "tallrec", "--out", tmp_path / "killed", *chosen)
    assert killed.exit_code != 0
    resumed = run("lora", "--resume", tmp_path / "killed")
    assert resumed.exit_code == 0, resumed.output
    assert "resumed" in resumed.output and "at step 2" in resumed.output
    expected = steps_and_losses(tmp_path / "whole")
    assert [s for s, _ in expected] == [1, 2, 3, 4, 5, 6]
    got = steps_and_losses(tmp_path / "killed")
    assert [s for s, _ in got] == [1, 2, 3, 4, 5, 6]
    assert [loss for _, loss in got] == pytest.approx([loss for _, loss in expected], rel=1e-5)
    summary = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert summary["steps"] == 6 and (summary["trainable_parameters"] < 10_000) == (method == "lora")


def test_a_run_over_its_memory_limit_stops_with_a_checkpoint_and_resumes_with_it_raised(tiny_as_builtin, tmp_path):
    chosen = [*SMALL, "--set", "train.steps=3", "--set", "lora.full_finetune=false", "--backend", "mlx"]
    stopped = run("lora", "--recipe", "tallrec", "--out", tmp_path / "a", *chosen, "--set", "train.memory_limit=1e-6")
    one_line_error(stopped, "stopped after step 1: the run's peak memory")
    assert "its checkpoint is written" in stopped.output and "of this machine's memory" in stopped.output
    one_line_error(run("lora", "--resume", tmp_path / "a", "--set", "train.steps=9"),
                   "only rl.completions_per_pass, train.grad_checkpoint, train.memory_limit may change")
    resumed = run("lora", "--resume", tmp_path / "a", "--set", "train.memory_limit=null")
    assert resumed.exit_code == 0, resumed.output
    assert "at step 1" in resumed.output and [s for s, _ in steps_and_losses(tmp_path / "a")] == [1, 2, 3]
    assert "memory_limit: null" in (tmp_path / "a" / "config.yaml").read_text()  # kept for the next resume


def test_adapter_is_refused_where_it_would_be_ignored(tiny_as_builtin, tmp_path):
    (tmp_path / "file").write_text("x")
    # the built-in model's tallrec section turns on full fine-tuning, which has no adapter to continue
    one_line_error(run("lora", "--recipe", "tallrec", "--adapter", tmp_path / "file", "--out", tmp_path / "a"),
                   "this run is full fine-tuning (lora.full_finetune=true (the recipe's builtin_model section")
    one_line_error(run("lora", "--recipe", "tallrec", "--adapter", tmp_path / "file", "--out", tmp_path / "b",
                       "--set", "lora.full_finetune=false"), "is a file")
    one_line_error(run("dpo", "--recipe", "dpo", "--adapter", tmp_path / "file", "--out", tmp_path / "c",
                       "--set", "lora.full_finetune=true"), "this run is full fine-tuning")
    assert not any((tmp_path / name).exists() for name in "abc")


def test_run_folder_mistakes_are_one_line_errors(tiny_model_dir, tmp_path):
    one_line_error(run("lora", "--resume", tmp_path), "not a run folder (no config.yaml)")
    one_line_error(run("dpo", "--resume", tmp_path / "nothing"), "no such run folder")
    (tmp_path / "file").write_text("x")
    one_line_error(run("lora", "--recipe", "tallrec", "--model", tiny_model_dir, "--out", tmp_path / "file"),
                   "is a file, not a folder")
    one_line_error(run("lora", "--recipe", "tallrec", "--set", "train=5", "--out", tmp_path / "a"),
                   "'train' must be a section of keys, not a value")
    one_line_error(run("lora", "--recipe", "tallrec", "--set", "train.checkpoint_every=0", "--out", tmp_path / "b"),
                   "'train.checkpoint_every' must be at least 1, got 0")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_bad_bytes_in_the_data_leave_no_run_folder(tiny_model_dir, tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_bytes(b'{"instruction": "Caf\xe9?", "output": "Yes."}\n')
    one_line_error(run("lora", "--recipe", "tallrec", "--model", tiny_model_dir, "--data", data, "--out", tmp_path / "r"),
                   "rows.jsonl:1: not UTF-8 text")
    assert not (tmp_path / "r").exists()


def test_a_template_with_a_colon_can_be_given_with_set(tiny_model_dir, tmp_path):
    template = "Generate a product description for the following item:\nFeatures: {features}\n\nDescription:"
    result = run("lora", "--recipe", "product-desc", "--model", tiny_model_dir, "--out", tmp_path / "p",
                 "--set", f"data.template={template}", "--set", "train.steps=1", "--set", "eval.every=0",
                 "--set", "eval.generate_examples=0", "--backend", "mlx")
    assert result.exit_code == 0, result.output
    assert "data.template" not in result.output
    import yaml

    assert yaml.safe_load((tmp_path / "p" / "config.yaml").read_text())["data"]["template"] == template
