"""The first steps' check (mlxft.train.first_step): a run that cannot train stops in one line before its
first report, on both backends, and a run that trains says it passed. Negative controls: a
learning rate of 0, an all-masked batch, a tensor cut off from the loss, an optimizer that does
not update; and the rules alone (LoRA's A gets its first gradient at step 2; RL waits for a
signal)."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest

from mlxft.config import load_config
from mlxft.data import batching
from mlxft.train.first_step import FirstStepCheck, TensorProbe, TrainsNothing, sample_points
from mlxft.train.runs import Run


def probe(name, gradient=1.0, finite=True, changed=True):
    return TensorProbe(name, gradient, finite, changed)


# --- the rules -------------------------------------------------------------------------------------


def test_lora_a_without_gradient_at_step_1_passes_when_step_2_reaches_it():
    check = FirstStepCheck(learning_rate=1e-3)
    assert check.observe(1, [probe("q.lora_a", gradient=0.0, changed=False), probe("q.lora_b")], 8, 1e-3) is None
    assert check.pending
    line = check.observe(2, [probe("q.lora_a"), probe("q.lora_b")], 8, 1e-3)
    assert line == "first steps check: all 2 trainable tensors got a finite gradient and changed"
    assert not check.pending


def test_a_tensor_no_gradient_reaches_in_two_steps_is_named():
    check = FirstStepCheck(learning_rate=1e-3)
    probes = [probe("a", gradient=0.0, changed=False), probe("b"), probe("c")]
    check.observe(1, probes, 8, 1e-3)
    with pytest.raises(TrainsNothing, match=r"in 2 steps no gradient reached 1 of 3 trainable tensors \(a\)"):
        check.observe(2, probes, 8, 1e-3)


@pytest.mark.parametrize("probes, scored, rate, message", [
    ([probe("a"), probe("b", changed=False)], 8, 1e-3, r"1 of 2 trainable tensors \(b\) got a gradient but did not "
                                                        r"change: the optimizer's update did not reach them"),
    ([probe("a", changed=False)], 8, 0.0, r"did not change: the learning rate is 0"),
    ([probe("a"), probe("b", gradient=float("nan"), finite=False)], 8, 1e-3, r"gradient is not finite in 1 of 2"),
    ([probe("a"), probe("b")], 0, 1e-3, r"step 1 scored nothing: every label in its batch is masked"),
    ([probe("a", gradient=0.0), probe("b", gradient=0.0)], 8, 1e-3, r"no gradient reached any of the 2"),
    ([], 8, 1e-3, r"no trainable tensor"),
])
def test_what_stops_a_run_at_step_1(probes, scored, rate, message):
    with pytest.raises(TrainsNothing, match=message):
        FirstStepCheck(learning_rate=rate).observe(1, probes, scored, rate)


def test_online_rl_waits_for_a_step_with_signal():
    # Every group's rewards equal: every advantage 0, no gradient anywhere. Not a fault for RL,
    # and the step does not count as one of the probed two.
    check = FirstStepCheck(learning_rate=1e-3, waits_for_signal=True)
    silent = [probe("a", gradient=0.0, changed=False), probe("b", gradient=0.0, changed=False)]
    for step in (1, 2, 3):
        assert check.observe(step, silent, 8, 1e-3) is None and check.pending
    assert check.observe(4, [probe("a", gradient=0.0, changed=False), probe("b")], 8, 1e-3) is None
    assert check.observe(5, [probe("a"), probe("b")], 8, 1e-3).startswith("first steps check: all 2")
    with pytest.raises(TrainsNothing, match="no gradient reached any"):  # the same silence is a fault elsewhere
        FirstStepCheck(learning_rate=1e-3).observe(1, silent, 8, 1e-3)


def test_sample_points_cover_a_tensor_evenly_and_boundedly():
    assert list(sample_points(5)) == [0, 1, 2, 3, 4]
    points = list(sample_points(49_152 * 576))
    assert 4096 <= len(points) <= 4097 and points[1] - points[0] == 49_152 * 576 // 4096


# --- on both backends --------------------------------------------------------------------------------


def train_fn(backend):
    if backend == "torch":
        pytest.importorskip("torch")
    from mlxft.methods import sft

    return partial(sft.train, backend=backend)


def lora_config(model_dir, out, *extra):
    return load_config("tallrec", [f"model.name={model_dir}", "data.k_shot=8", "data.max_valid_rows=4", "train.batch_size=4",
                                   "train.steps=3", "train.learning_rate=1e-2", "train.warmup_steps=0", "eval.every=0",
                                   "lora.full_finetune=false", "lora.dropout=0", f"out={out}", *extra])


def train(backend, model_dir, tmp_path, *extra):
    said = []
    c = lora_config(model_dir, tmp_path / "run", *extra)
    summary = train_fn(backend)(c, Run.create(tmp_path / "run", c), echo=said.append)
    return summary, said


BACKENDS = ["mlx", "torch"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_run_that_trains_says_the_check_passed(tiny_model_dir, tmp_path, capsys, backend):
    summary, _ = train(backend, tiny_model_dir, tmp_path)
    # LoRA r 8 on q and v of the built-in model's 2 blocks: 4 modules, an A and a B each; said
    # where the step reports go, before the first of them
    reports = capsys.readouterr().err.splitlines()
    assert reports[0] == "first steps check: all 8 trainable tensors got a finite gradient and changed"
    assert reports[1].startswith("step 3/3") and summary["steps"] == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_learning_rate_0_stops_at_step_1_unless_a_control_run(tiny_model_dir, tmp_path, capsys, backend):
    with pytest.raises(TrainsNothing, match=r"step 1: 4 of 8 trainable tensors \(.*lora_[bB].*\) got a gradient but "
                                            r"did not change: the learning rate is 0"):
        train(backend, tiny_model_dir, tmp_path / "a", "train.learning_rate=0")
    summary, _ = train(backend, tiny_model_dir, tmp_path / "b", "train.learning_rate=0", "train.check_first_step=false")
    assert summary["steps"] == 3 and "first steps check" not in capsys.readouterr().err


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_all_masked_batch_stops_at_step_1(tiny_model_dir, tmp_path, monkeypatch, backend):
    real = batching.scored_targets

    def masked(batch):
        targets = real(batch)
        return type(targets)(**{**vars(targets), "weights": np.zeros_like(targets.weights)})

    monkeypatch.setattr(f"mlxft.backends.{backend}.steps.scored_targets", masked)
    with pytest.raises(TrainsNothing, match="step 1 scored nothing: every label in its batch is masked"):
        train(backend, tiny_model_dir, tmp_path)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_tensor_cut_off_from_the_loss_is_named(tiny_model_dir, tmp_path, monkeypatch, backend):
    """Block 0's q_proj adapter runs, but its output is detached: its A and B never get a gradient."""
    from mlxft.methods import sft as trainer

    real = trainer.build_policy

    def cut_off(backend_, model, *args, **kwargs):
        spec = real(backend_, model, *args, **kwargs)
        if backend == "mlx":
            import mlx.core as mx

            from mlxft.backends.mlx.lora import AdapterLinear

            layer = model.model.layers[0].self_attn.q_proj
            assert isinstance(layer, AdapterLinear)
            base = layer.linear
            layer.__class__ = type("Detached", (AdapterLinear,), {
                "__call__": lambda self, x: base(x) + mx.stop_gradient(AdapterLinear.__call__(self, x) - base(x))})
        else:
            layer = next(m for name, m in model.named_modules() if name.endswith("layers.0.self_attn.q_proj"))
            layer.lora_B["default"].register_forward_hook(lambda module, inputs, output: output.detach())
        return spec

    monkeypatch.setattr(trainer, "build_policy", cut_off)
    with pytest.raises(TrainsNothing, match=r"in 2 steps no gradient reached 2 of 8 trainable tensors "
                                            r"\(.*layers.0.self_attn.q_proj.lora_[aA].*layers.0.self_attn.q_proj.lora_[bB]"):
        train(backend, tiny_model_dir, tmp_path)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_optimizer_that_updates_nothing_is_caught(tiny_model_dir, tmp_path, monkeypatch, backend):
    """What mlx-lm-lora's GRPO #50 did (a compiled step that froze the LoRA weights), made on purpose."""
    if backend == "mlx":
        import mlx.optimizers as optim

        monkeypatch.setattr(optim.AdamW, "update", lambda self, model, gradients: None)
    else:
        from mlxft.backends.torch.adamw import MLXAdamW

        monkeypatch.setattr(MLXAdamW, "step", lambda self, closure=None: None)
    with pytest.raises(TrainsNothing, match="got a gradient but did not change: the optimizer's update did not reach "
                                            "them at learning rate 0.01"):
        train(backend, tiny_model_dir, tmp_path)


def test_the_error_is_one_line_from_the_cli(tiny_model_dir, tmp_path):
    from click.testing import CliRunner

    from mlxft.cli import cli

    result = CliRunner().invoke(cli, ["lora", "--recipe", "tallrec", "--model", str(tiny_model_dir), "--out",
                                      str(tmp_path / "run"), "--set", "train.learning_rate=0", "--set", "train.steps=2",
                                      "--set", "eval.every=0", "--set", "data.k_shot=8"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    error = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "got a gradient but did not change: the learning rate is 0" in error[0]
