"""`mlxft plan`: the fit of peak memory against rows and length, and what it says fits."""

from __future__ import annotations

import json

import pytest
from test_cli_train import one_line_error, run

from mlxft.config import load_config
from mlxft.train.plan import fit, measure_peaks, plan, synthetic_pairs


def test_the_fit_recovers_fixed_linear_and_square_parts_and_what_fits():
    fixed, linear, square, length = 1.0, 1e-3, 2e-6, 512
    peak = lambda rows, n: fixed + rows * (linear * n + square * n * n)  # noqa: E731
    model = fit(peak(1, length), peak(2, length), peak(1, length // 2), length)
    assert (model.fixed, model.linear, model.square) == pytest.approx((fixed, linear, square), rel=1e-9)
    limit = 10.0
    batch = model.largest_batch(length, limit)
    assert peak(batch, length) <= limit < peak(batch + 1, length)  # 8 rows of 512: 1 + 8 * 1.036288
    cutoff = model.largest_length(4, limit)
    assert peak(4, cutoff) <= limit < peak(4, cutoff + 1)
    assert model.largest_batch(length, 0.5) == 0 and model.largest_length(4, 0.5) == 0  # the weights alone do not fit


@pytest.mark.slow
def test_three_small_steps_predict_the_peak_of_a_larger_batch(tiny_model_dir, tmp_path):
    # With accumulation a step's peak is still one micro-batch's: plan measures one (a workload
    # of k micro-batches a step would not match the batches it hands the bench).
    config = load_config("tallrec", [f"model.name={tiny_model_dir}", "lora.full_finetune=false", "train.grad_accumulation=2"])
    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    half, one, two, six = measure_peaks(config, tiny_model_dir, "mlx", [(1, 64), (1, 128), (2, 128), (6, 128)], vocab,
                                        0, tmp_path, 1)
    predicted = fit(one, two, half, 128).peak(6, 128)
    print(f"peaks (GB): 1 x 64 {half:.4f}, 1 x 128 {one:.4f}, 2 x 128 {two:.4f}, 6 x 128 {six:.4f}; "
          f"predicted {predicted:.4f}")
    assert predicted == pytest.approx(six, rel=0.05)  # measured within 1.5%
    # A line through the origin (no fixed part) would predict 6 times one row: further off.
    assert abs(6 * one - six) > abs(predicted - six)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dpo", "reward", "rl", "ppo"])
def test_pair_and_rollout_steps_predict_the_peak_of_a_larger_batch(tiny_model_dir, tmp_path, method):
    # DPO's step (reference forward, then the policy on both answers, each prompt once) and the
    # reward model's (both rows through the scalar head), on synthetic pairs sharing their prompt;
    # an RL training pass (the reference's log-probs, then GRPO's loss) on [prompt | completion] rows.
    # Passes of up to 8 completions: the bench runs the trainer's own RL step, which cuts a rollout
    # into passes of rl.completions_per_pass (4 by default), and 5 rows must be one pass here.
    rollouts = ["rl.max_prompt_length=96", "rl.max_completion_length=32", "rl.completions_per_pass=8"]
    recipe, lengths = {"rl": ("grpo", rollouts), "ppo": ("grpo", [*rollouts, "rl.algo=ppo"])}.get(
        method, (method, [f"{method}.max_prompt_length=48"]))
    config = load_config(recipe, [f"model.name={tiny_model_dir}", *lengths])
    vocab = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    # The reward step's peak moves by ~0.3 MB from run to run at these sizes (the allocator), 5% of
    # a 128-token pair's: its rows are twice as long, so that the jitter stays below the tolerance.
    n = 256 if method == "reward" else 128
    half, one, two, five = measure_peaks(config, tiny_model_dir, "mlx", [(1, n // 2), (1, n), (2, n), (5, n)], vocab,
                                         0, tmp_path, 1, "rl" if method == "ppo" else method)
    predicted = fit(one, two, half, n).peak(5, n)
    print(f"{method} peaks (GB): 1 x {n // 2} {half:.4f}, 1 x {n} {one:.4f}, 2 x {n} {two:.4f}, 5 x {n} {five:.4f}; "
          f"predicted {predicted:.4f}")
    assert predicted == pytest.approx(five, rel=0.05)
    assert abs(5 * one - five) > abs(predicted - five)


def test_synthetic_pairs_share_their_prompt_and_score_the_answers():
    batch = synthetic_pairs(2, 10, 4, vocab=100, seed=0)
    assert batch.input_ids.shape == (4, 10)
    assert (batch.input_ids[2:, :4] == batch.input_ids[:2, :4]).all() and (batch.input_ids[2:, 4:] != batch.input_ids[:2, 4:]).any()
    assert batch.loss_mask[:, :4].sum() == 0 and batch.loss_mask[:, 4:].all()


def test_the_plan_says_what_fits(monkeypatch, tiny_model_dir):
    peaks = {(1, 256): 1.3, (1, 512): 1.6, (2, 512): 2.2}  # fixed 1 GB, 0.6 GB a row of 512
    monkeypatch.setattr("mlxft.train.plan.measure_peaks", lambda *a: [peaks[s] for s in a[3]])
    monkeypatch.setattr("mlxft.train.plan.device_budget", lambda backend: (10.0, "a test budget"))
    config = load_config("tallrec", [f"model.name={tiny_model_dir}", "lora.full_finetune=false", "data.cutoff=512",
                                     "train.batch_size=16", "train.memory_limit=0.8"])
    lines = []
    planned = plan(config, "mlx", echo=lines.append)
    assert planned["predicted_peak_gb"] == pytest.approx(1 + 16 * 0.6)
    assert "needs about 10.60 GB; does NOT fit in train.memory_limit=0.8 of a test budget (8.00 of 10.00 GB)" in lines[-3]
    # measured again with checkpointing, which (the same peaks here) does not help
    assert lines[-1].startswith("with gradient checkpointing (--set train.grad_checkpoint=true") and "does not fit either" in lines[-1]
    assert planned["largest_batch_size"] == 11  # 1 + 11 * 0.6 = 7.6 <= 8 < 8.2
    assert 1 + 16 * fit(1.6, 2.2, 1.3, 512).per_row(planned["largest_cutoff"]) <= 8.0


def test_a_run_that_does_not_fit_is_measured_again_with_checkpointing(monkeypatch, tiny_model_dir):
    plain = {(1, 256): 1.3, (1, 512): 1.6, (2, 512): 2.2}  # fixed 1 GB, 0.6 GB a row of 512
    checkpointed = {(1, 256): 1.1, (1, 512): 1.2, (2, 512): 1.4}  # fixed 1 GB, 0.2 GB a row
    asked = []

    def measure(config, *a):
        asked.append((config.train.grad_checkpoint, config.lora.dropout))
        return [(checkpointed if config.train.grad_checkpoint else plain)[s] for s in a[2]]

    monkeypatch.setattr("mlxft.train.plan.measure_peaks", measure)
    monkeypatch.setattr("mlxft.train.plan.device_budget", lambda backend: (10.0, "a test budget"))
    config = load_config("tallrec", [f"model.name={tiny_model_dir}", "lora.full_finetune=false", "data.cutoff=512",
                                     "train.batch_size=16", "train.memory_limit=0.8", "lora.dropout=0.05"])
    lines = []
    planned = plan(config, "mlx", echo=lines.append)
    assert asked == [(False, 0.05), (True, 0.0)]  # MLX's checkpointing takes no LoRA dropout
    assert planned["with_grad_checkpoint"] == {"measured_gb": {"one_half": 1.1, "one_full": 1.2, "two_full": 1.4},
                                               "predicted_peak_gb": pytest.approx(1 + 16 * 0.2), "largest_batch_size": 35,
                                               "fits": True}
    assert lines[-1] == ("with gradient checkpointing (--set train.grad_checkpoint=true --set lora.dropout=0): about 4.20 GB, "
                         "which fits; largest train.batch_size then: 35")
    # A run that fits is measured once, and one already checkpointed is not measured again.
    for extra in ("train.batch_size=4", "train.grad_checkpoint=true"):
        asked.clear()
        config = load_config("tallrec", [f"model.name={tiny_model_dir}", "lora.full_finetune=false", "data.cutoff=512",
                                         "train.batch_size=16", "train.memory_limit=0.8", extra])
        assert "with_grad_checkpoint" not in plan(config, "torch", echo=lambda *a: None) and len(asked) == 1


@pytest.mark.slow
def test_checkpointing_lowers_the_measured_peak_and_the_plan_says_so(monkeypatch):
    """The built-in model at 4 x 512 tokens, measured: with gradient checkpointing a row's
    activations cost 0.60 of what they cost without (measured), and a budget between the two
    peaks is one that only the checkpointed run fits."""
    from mlxft.models.builtin import PACKAGED

    config = load_config("tallrec", [f"model.name={PACKAGED}", "lora.full_finetune=false", "data.cutoff=512",
                                     "train.batch_size=4", "lora.dropout=0"])
    monkeypatch.setattr("mlxft.train.plan.device_budget", lambda backend: (100.0, "a test budget"))
    plain = plan(config, "mlx", threads=1, echo=lambda *a: None)
    assert "with_grad_checkpoint" not in plain
    need = plain["predicted_peak_gb"]
    monkeypatch.setattr("mlxft.train.plan.device_budget", lambda backend: (0.8 * need, "a test budget"))
    lines = []
    told = plan(config, "mlx", threads=1, echo=lines.append)["with_grad_checkpoint"]
    print(f"4 x 512: {need:.4f} GB without checkpointing, {told['predicted_peak_gb']:.4f} GB with")
    assert told["fits"] and told["predicted_peak_gb"] < 0.75 * need  # measured 0.62
    assert "(--set train.grad_checkpoint=true): about" in lines[-1] and lines[-1].endswith(", which fits; largest train.batch_size then: "
                                                                                             f"{told['largest_batch_size']}")


def test_plan_mistakes_are_one_line_errors(tiny_as_builtin):
    one_line_error(run("plan", "--recipe", "dpo", "--for", "dpo", "--set", "dpo.loss_type=kto"), "does not measure KTO")
    one_line_error(run("plan", "--recipe", "grpo", "--for", "rl", "--set", "rl.max_prompt_length=null"),
                   "set the prompt's")
    one_line_error(run("plan", "--recipe", "tallrec"), "full fine-tuning is not measured")  # the built-in model's tallrec
    one_line_error(run("plan", "--recipe", "nope"), "nope")
