"""Saved equals trained: every LoRA run loads its saved adapter back and checks it on a probe batch,
on both backends; a save that lost the training, or an adapter that changes nothing, is said."""

from functools import partial

import pytest

from mlxft.config import load_config
from mlxft.errors import UserError
from mlxft.methods import sft
from mlxft.models import adapters
from mlxft.train.runs import Run


def trainer(backend):
    if backend == "torch":
        pytest.importorskip("torch")
    return partial(sft.train, backend=backend)


def config(model_dir, out, *extra):
    return load_config("tallrec", [f"model.name={model_dir}", "data.k_shot=8", "data.max_valid_rows=4", "train.batch_size=4",
                                   "train.steps=2", "train.learning_rate=1e-2", "eval.every=0", f"out={out}", *extra])


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_a_run_checks_its_saved_adapter_against_the_trained_model(tiny_model_dir, tmp_path, backend):
    c = config(tiny_model_dir, tmp_path / "run")
    summary = trainer(backend)(c, Run.create(tmp_path / "run", c), echo=lambda *a: None)
    check = summary["saved_check"]
    assert check["saved_vs_trained"] == 0.0  # float32 adapters reload exactly
    assert check["adapter_changes_logits"] and check["adapter_effect"] > 1e-4 and check["probe_tokens"] > 10


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_a_save_that_lost_the_training_stops_the_run(tiny_model_dir, tmp_path, monkeypatch, backend):
    real_save = adapters.save_adapter

    def loses_b(folder, spec, weights, modules=None):  # a writer bug: B written as zeros
        return real_save(folder, spec, {m: (a, b * 0) for m, (a, b) in weights.items()}, modules)

    monkeypatch.setattr("mlxft.models.adapters.save_adapter", loses_b)  # what both checkpoints save through
    c = config(tiny_model_dir, tmp_path / "run")
    with pytest.raises(UserError, match="does not reproduce the trained model"):
        trainer(backend)(c, Run.create(tmp_path / "run", c), echo=lambda *a: None)


def test_an_adapter_that_changes_nothing_is_said_out_loud(tiny_model_dir, tmp_path):
    said = []
    c = config(tiny_model_dir, tmp_path / "run", "train.learning_rate=0", "train.check_first_step=false")
    summary = sft.train(c, Run.create(tmp_path / "run", c), echo=said.append)
    assert summary["saved_check"]["adapter_changes_logits"] is False
    assert any("does not change the model's logits" in line for line in said)

