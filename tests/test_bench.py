"""`mlxft bench` and `mlxft doctor` on the 2-layer test model: every column is there, tokens are
counted from the timed batches only, both backends do the same work (same losses), and the
files are written. No timing assertions: timings belong in benchmark output, not in tests."""

import json
import re

import numpy as np
import pytest
from click.testing import CliRunner

from mlxft.bench import flops, harness
from mlxft.bench import workload as workloads
from mlxft.cli import cli
from mlxft.errors import UserError

SMALL = ["data.max_history=3", "data.k_shot=24"]  # short rows, few of them: a step takes milliseconds


@pytest.fixture(scope="module")
def both(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "lora"
    lines = []
    report = harness.bench("lora", ["mlx", "torch"], model=str(tiny_model_dir), steps=2, warmup=1, batch_size=4,
                           overrides=SMALL, out=out, threads=1, echo=lines.append)
    return report, out, "\n".join(lines)


@pytest.mark.slow
def test_the_table_has_every_column_for_both_backends(both):
    report, _, printed = both
    assert [row["backend"] for row in report["rows"]] == ["mlx", "torch"]
    for row in report["rows"]:
        assert row["available"], row
        for _, key in harness.COLUMNS:
            assert row[key] is not None, key
        assert row["tokens_per_second"] > row["supervised_tokens_per_second"] > 0
        assert 0 < row["peak_share"] < 1 and row["peak_memory_gb"] > 0
    header = next(line for line in printed.splitlines() if line.startswith("backend"))
    for title, _ in harness.COLUMNS:
        assert title in header
    assert re.search(r"^mlx +cpu|^mlx +Device\(cpu", printed, re.MULTILINE) and re.search(r"^torch +cpu", printed, re.MULTILINE)


@pytest.mark.slow
def test_warmup_is_run_but_not_timed_and_tokens_are_the_timed_batches(both):
    report, out, _ = both
    work = workloads.load(out / "workload" / "workload.json")
    assert len(work.steps) == 3  # 1 warm-up + 2 timed
    timed_batches = [b for micro in work.steps[1:] for b in micro]
    non_padding = sum(int(b.lengths.sum()) for b in timed_batches)
    assert non_padding == sum(int((np.arange(b.input_ids.shape[1]) < b.lengths[:, None]).sum()) for b in timed_batches)
    supervised = sum(int(b.loss_mask[:, 1:].sum()) for b in timed_batches)
    for row in report["rows"]:
        # each backend pads as its trainer does: MLX to a multiple (few traced shapes), PyTorch not at all
        padded_batches = [b for micro in work.for_backend(row["backend"]).steps[1:] for b in micro]
        widths = [b.input_ids.shape[1] for b in padded_batches]
        if row["backend"] == "torch":
            assert widths == [int(b.lengths.max()) for b in timed_batches]
        else:
            assert all(w % 16 == 0 and w - 16 < int(b.lengths.max()) <= w for w, b in zip(widths, timed_batches))
        padded = sum(b.input_ids.size for b in padded_batches)
        assert report["pad_multiple"][row["backend"]] == (1 if row["backend"] == "torch" else 16)
        steps = report["results"][row["backend"]]["steps"]
        assert [s["timed"] for s in steps] == [False, True, True]
        assert row["timed_steps"] == 2 and row["warmup_steps"] == 1
        assert row["timed_seconds"] == pytest.approx(sum(s["seconds"] for s in steps[1:]))
        assert row["timed_tokens"] == non_padding
        assert row["tokens_per_second"] * row["timed_seconds"] == pytest.approx(non_padding)
        assert row["supervised_tokens_per_second"] * row["timed_seconds"] == pytest.approx(supervised)
        assert row["padding_fraction"] == pytest.approx(1 - non_padding / padded)
    # the warm-up step's batch is not among the counted ones (it would change the count)
    assert sum(int(b.lengths.sum()) for b in work.steps[0]) > 0


@pytest.mark.slow
def test_same_weights_and_batches_give_the_same_losses_on_both_backends(both):
    report, _, _ = both
    mlx_steps, torch_steps = (report["results"][b]["steps"] for b in ("mlx", "torch"))
    assert abs(report["rows"][0]["last_loss"] - report["rows"][1]["last_loss"]) < 1e-5  # measured: 0
    assert max(abs(a["loss"] - b["loss"]) for a, b in zip(mlx_steps, torch_steps)) < 1e-5  # measured: 6.4e-7
    assert report["loss_agreement"]["max_abs_difference"] < 1e-5
    # they trained (a learning rate > 0 moved the adapter): the agreement is not of two idle runs
    assert mlx_steps[-1]["grad_norm"] > 0 and len({round(s["loss"], 6) for s in mlx_steps}) == 3


@pytest.mark.slow
def test_bench_json_and_png_are_written(both):
    report, out, _ = both
    saved = json.loads((out / "bench.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(report["rows"]))
    assert saved["peak_gemm_gflops"] > 0 and saved["mlx_blas"]
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def dpo_runs(tiny_model_dir, tmp_path_factory):
    """The dpo workload on both backends, with each prompt run once (the trainers' default) and
    with the 2B rows (dpo.share_prompt=false)."""
    runs = {}
    for shared in (True, False):
        out, lines = tmp_path_factory.mktemp("bench") / f"dpo-{shared}", []
        runs[shared] = harness.bench("dpo", ["mlx", "torch"], model=str(tiny_model_dir), steps=2, warmup=1, batch_size=3,
                                     overrides=[f"dpo.share_prompt={str(shared).lower()}"], out=out, threads=1,
                                     echo=lines.append), out, "\n".join(lines)
    return runs


@pytest.mark.slow
def test_dpo_with_shared_prompts_does_the_same_work_on_fewer_tokens(dpo_runs):
    from mlxft.backends.mlx import SHARED_PROMPT_FEW_WIDTHS, SHARED_PROMPT_PAD_MULTIPLE
    from mlxft.data.shared_prompt import share_prompts

    (shared, out, printed), (rows, _, printed_rows) = dpo_runs[True], dpo_runs[False]
    assert "each prompt run once, prompt and answer widths to a multiple of 4 (mlx), 1 (torch)" in printed
    assert "each prompt run once" not in printed_rows
    work = workloads.load(out / "workload" / "workload.json")
    timed = [b for micro in work.steps[1:] for b in micro]
    layouts = [share_prompts(b, work.pad_id, SHARED_PROMPT_PAD_MULTIPLE, few_widths=SHARED_PROMPT_FEW_WIDTHS) for b in timed]
    for report, is_shared in ((shared, True), (rows, False)):
        for row in report["rows"]:
            assert row["available"] and row["shared_prompts"] is is_shared, row
            assert row["timed_tokens"] == sum(b.tokens for b in timed)  # tokens/s counts the rows either way
    mlx_shared, mlx_rows = shared["rows"][0], rows["rows"][0]
    assert mlx_shared["computed_tokens_per_second"] * mlx_shared["timed_seconds"] == pytest.approx(
        sum(x.computed_tokens for x in layouts))
    assert mlx_shared["padding_fraction"] == pytest.approx(
        1 - sum(x.computed_tokens for x in layouts) / sum(x.computed_positions for x in layouts))
    assert sum(x.computed_tokens for x in layouts) < 0.9 * mlx_shared["timed_tokens"]
    assert mlx_rows["computed_tokens_per_second"] == pytest.approx(mlx_rows["tokens_per_second"])
    # Same batches, same adapter: both layouts, on both backends, give the same losses step by step.
    losses = [[s["loss"] for s in report["results"][b]["steps"]] for report in (shared, rows) for b in ("mlx", "torch")]
    assert np.ptp(np.array(losses), axis=0).max() < 2e-5  # measured: 2.1e-6
    assert shared["loss_agreement"]["max_abs_difference"] < 2e-5
    # and the steps train: step 1 is log 2 (the policy is the reference), step 2 moved off it by
    # more than float32's noise on these sums (measured: 2.3e-6 on MLX, 8e-7 on torch; noise ~2e-7)
    assert losses[0][0] == pytest.approx(np.log(2), abs=1e-6)
    assert all(abs(run[1] - run[0]) > 4e-7 for run in losses), losses


def test_flop_count_matches_the_model(tiny_model_dir):
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlxft.backends.mlx import lora
    from mlxft.backends.mlx import model as mlx_model
    from mlxft.models.adapters import AdapterSpec

    model, _, folder = mlx_model.load(str(tiny_model_dir))
    spec = AdapterSpec(4, 8, 0.0, ["q_proj", "v_proj"], "x", layers=[1])
    config = json.loads((folder / "config.json").read_text())
    counts = flops.parameter_counts(config, spec)
    weights = dict(tree_flatten(model.parameters()))
    block = sum(v.size for k, v in weights.items() if ".layers." in k and k.endswith("proj.weight"))
    assert counts["blocks"] == block
    assert counts["head"] == weights["model.embed_tokens.weight"].size
    lora.apply_lora(model, spec)
    assert counts["adapter"] == lora.trainable_parameters(model)
    assert flops.step_flops(counts, 10, 2) == 6 * (block + counts["adapter"]) * 10 + 6 * counts["head"] * 2
    assert flops.step_flops(counts, 10, 2, reference_forward=True) == 8 * (block + counts["adapter"]) * 10 + 8 * counts["head"] * 2
    del mx


def test_a_backend_that_cannot_run_is_reported_not_faked(tiny_model_dir, tmp_path, monkeypatch):
    import mlxft.backends

    monkeypatch.setattr(mlxft.backends, "torch_available", lambda: False)
    lines = []
    report = harness.bench("lora", ["torch"], model=str(tiny_model_dir), steps=1, warmup=0, overrides=SMALL,
                           out=tmp_path / "b", plot=False, echo=lines.append)
    (row,) = report["rows"]
    assert row == {"backend": "torch", "available": False, "reason": mlxft.backends.TORCH_HINT}
    assert any(line.startswith("torch") and "not available" in line for line in "\n".join(lines).splitlines())


def test_bad_settings_are_one_line_errors(tiny_model_dir, tmp_path):
    with pytest.raises(UserError, match="--backends"):
        harness.parse_backends("mlx,jax")
    with pytest.raises(UserError, match="full_finetune"):
        workloads.resolve_config("lora", str(tiny_model_dir), ["lora.full_finetune=true"], None, None)
    with pytest.raises(UserError, match="data.packing is not benchmarked"):
        workloads.resolve_config("lora", str(tiny_model_dir), ["data.packing=true"], None, None)
    runner = CliRunner()
    result = runner.invoke(cli, ["bench", "--backends", "tf", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and result.output.startswith("error: --backends")


def test_doctor_prints_the_blas_and_gemm_rates():
    result = CliRunner().invoke(cli, ["doctor"])
    assert result.exit_code == 0, result.output
    lines = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in result.output.strip().splitlines())
    assert "BLAS" in lines["MLX BLAS"] and lines["mlx"] != "not installed"
    for key in ("MLX GEMM", "numpy GEMM"):
        assert float(re.match(r"([\d.]+) GFLOP/s", lines[key]).group(1)) > 0
    assert lines["torch device"].startswith("cpu")
