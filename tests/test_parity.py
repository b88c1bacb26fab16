"""End to end, the two backends are one trainer: train() on MLX and on PyTorch from the same
starting adapter, on the same data, writes the same metrics.jsonl, report by report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mlxft.config import load_config
from mlxft.methods import dpo, reward, sft
from mlxft.models.adapters import AdapterSpec, save_adapter
from mlxft.train.runs import Run

pytest.importorskip("peft")
pytestmark = pytest.mark.slow

# Not compared: timings and memory, and the step counters that are equal by construction.
VOLATILE = {"tokens_per_second", "peak_memory_gb", "peak_rss_gb", "active_memory_gb", "cache_memory_gb", "step",
            "epoch", "trained_tokens"}


def starting_adapter(model_dir, folder, seed=5, dora=False):
    """A LoRA adapter with both A and B non-zero, so the first steps already move the outputs; for
    DoRA, with magnitudes off the row norms of W + scaling * B @ A, so that they rescale too."""
    from safetensors.numpy import load_file

    rng = np.random.default_rng(seed)
    spec = AdapterSpec(4, 8, 0.0, ["q_proj", "v_proj"], str(model_dir), use_dora=dora)
    base = load_file(str(model_dir / "model.safetensors")) if dora else {}
    weights = {}
    for layer in range(2):
        for module in ("q_proj", "v_proj"):
            path = f"model.layers.{layer}.self_attn.{module}"
            a, b = rng.normal(0, 0.2, (4, 32)).astype(np.float32), rng.normal(0, 0.2, (32, 4)).astype(np.float32)
            weights[path] = (a, b)
            if dora:
                norms = np.linalg.norm(base[f"{path}.weight"] + spec.scaling * b @ a, axis=1)
                weights[path] = (a, b, norms * rng.uniform(0.8, 1.2, 32).astype(np.float32))
    save_adapter(folder, spec, weights)
    return folder


def train_both(method, recipe, model_dir, tmp_path, *extra, dora=False):
    adapter = starting_adapter(model_dir, tmp_path / "start", dora=dora)
    records = {}
    for name in ("mlx", "torch"):
        config = load_config(recipe, [
            f"model.name={model_dir}", "data.k_shot=24", "data.max_valid_rows=8", "data.max_history=3",
            "train.batch_size=4", "train.steps=6", "train.report_every=1", "train.warmup_steps=2",
            "train.learning_rate=1e-2", "train.weight_decay=0.01", "train.max_grad_norm=0.5", "eval.every=2",
            "eval.generate_examples=0", "lora.dropout=0.0", f"out={tmp_path / name}", *extra])
        train = {"sft": sft.train, "dpo": dpo.train, "reward": reward.train}[method]
        train(config, Run.create(tmp_path / name, config), backend=name, adapter=str(adapter), echo=lambda *a: None)
        records[name] = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return records["mlx"], records["torch"]


def worst_difference(mlx, torch):
    assert [list(r) for r in torch] == [list(r) for r in mlx]
    worst, where = 0.0, None
    for m, t in zip(mlx, torch):
        for key in m:
            # Before the first update the policy is its reference: every margin is float noise
            # (~1e-6), and which side of zero it falls on decides rewards/accuracies.
            tie = key.endswith("rewards/accuracies") and abs(m[key.replace("accuracies", "margins")]) < 1e-4
            if key not in VOLATILE and not tie:
                difference = abs(t[key] - m[key]) / max(1.0, abs(m[key]))
                if difference > worst:
                    worst, where = difference, (m["step"], key)
    return worst, where


def test_sft_runs_agree_report_by_report(tiny_model_dir, tmp_path):
    mlx, torch = train_both("sft", "tallrec", tiny_model_dir, tmp_path)
    worst, where = worst_difference(mlx, torch)
    print(f"SFT: {len(mlx)} reports, largest |torch - mlx| {worst:.1e} at {where}")
    assert worst < 2.5e-5  # measured: 2.4e-6 (grad_norm)
    assert {"eval_loss", "eval_auc"} <= set(mlx[1])  # validation is compared too
    assert mlx[-1]["loss"] < mlx[0]["loss"] - 0.01  # it trained: not two idle runs agreeing


def test_dora_sft_runs_agree_report_by_report(tiny_model_dir, tmp_path):
    # DoRA's magnitudes train beside A and B, through the norm both backends hold constant.
    mlx, torch = train_both("sft", "tallrec", tiny_model_dir, tmp_path, "train.steps=4", dora=True)
    worst, where = worst_difference(mlx, torch)
    print(f"DoRA SFT: {len(mlx)} reports, largest |torch - mlx| {worst:.1e} at {where}")
    assert worst < 5e-6
    assert "eval_loss" in mlx[1] and mlx[-1]["loss"] < mlx[0]["loss"] - 0.01


def test_dpo_runs_agree_report_by_report(tiny_model_dir, tmp_path):
    # A continued adapter: the reference is base + that adapter, scored once on each backend.
    mlx, torch = train_both("dpo", "dpo", tiny_model_dir, tmp_path)
    worst, where = worst_difference(mlx, torch)
    print(f"DPO: {len(mlx)} reports, largest |torch - mlx| {worst:.1e} at {where}")
    assert worst < 1.5e-5  # measured: 1.5e-6 (rewards/chosen)
    assert "eval_rewards/accuracies" in mlx[1]
    assert mlx[-1]["rewards/margins"] > 0.01


@pytest.mark.parametrize("loss_type", ["simpo", "orpo"])
def test_reference_free_losses_agree_and_run_no_reference(tiny_model_dir, tmp_path, loss_type):
    mlx, torch = train_both("dpo", "dpo", tiny_model_dir, tmp_path, f"dpo.loss_type={loss_type}", "dpo.beta=1.0")
    worst, where = worst_difference(mlx, torch)
    print(f"{loss_type}: {len(mlx)} reports, largest |torch - mlx| {worst:.1e} at {where}")
    assert worst < 1.5e-5
    summary = json.loads((tmp_path / "mlx" / "summary.json").read_text())
    assert summary["reference"] == f"none ({loss_type} needs no reference model)" and summary["loss_type"] == loss_type
    assert not (tmp_path / "mlx" / "reference_logps.safetensors").exists()  # not even for a continued adapter
    assert mlx[-1]["loss"] < mlx[0]["loss"]


def test_reward_runs_agree_report_by_report(tiny_model_dir, tmp_path):
    # The head starts from the same numbers on both (drawn in numpy), on a continued LM adapter.
    mlx, torch = train_both("reward", "reward", tiny_model_dir, tmp_path)
    worst, where = worst_difference(mlx, torch)
    print(f"reward: {len(mlx)} reports, largest |torch - mlx| {worst:.1e} at {where}")
    assert worst < 1.5e-5
    assert "eval_accuracy" in mlx[1]
    assert mlx[-1]["loss"] < mlx[0]["loss"]


def test_kto_runs_agree_report_by_report(tiny_model_dir, tmp_path):
    # Unpaired rows (each bundled pair as a desirable and an undesirable answer), reference = base + the adapter.
    mlx, torch = train_both("dpo", "dpo", tiny_model_dir, tmp_path, "dpo.loss_type=kto")
    worst, where = worst_difference(mlx, torch)
    print(f"kto: {len(mlx)} reports, largest |torch - mlx| {worst:.1e} at {where}")
    assert worst < 1.5e-5
    assert {"kl", "eval_rewards/margins"} <= set(mlx[1])
    assert mlx[-1]["rewards/margins"] > mlx[0]["rewards/margins"]
