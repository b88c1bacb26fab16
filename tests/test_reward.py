"""Reward models (mlxft.methods.reward, mlxft.losses.reward, on both engines): the Bradley-Terry loss by hand on
three array libraries, where the head reads, MIND-derived pairs, the saved adapter as PEFT and
transformers load it, resume after a kill, and the mistakes users make."""

from __future__ import annotations

import json
from functools import partial

import mlx.core as mx
import numpy as np
import pytest

from mlxft.config import load_config
from mlxft.data.sources.mind import iter_preference_rows
from mlxft.errors import UserError
from mlxft.losses.reward import reward_objective, summarize
from mlxft.models.heads import score_positions
from mlxft.resources import bundled
from mlxft.train.runs import Run


def tiny_config(model_dir, out, *extra):
    return load_config("reward", [
        f"model.name={model_dir}", "data.k_shot=24", "data.max_valid_rows=8", "train.batch_size=4",
        "train.steps=6", "train.report_every=1", "train.warmup_steps=2", "train.learning_rate=1e-2",
        "train.checkpoint_every=3", "eval.every=3", "lora.dropout=0.0", f"out={out}", *extra])


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --- the loss --------------------------------------------------------------------------------------


@pytest.mark.parametrize("xp", ["numpy", "mlx", "torch"])
def test_bradley_terry_loss_and_metrics_by_hand(xp):
    scores = [2.0, 0.5, 1.0, 1.5]  # chosen 2.0 and 0.5; rejected 1.0 and 1.5
    if xp == "numpy":
        values, lib, detach = np.array(scores), np, lambda x: x
    elif xp == "mlx":
        values, lib, detach = mx.array(scores), mx, mx.stop_gradient
    else:
        torch = pytest.importorskip("torch")
        values, lib, detach = torch.tensor(scores, dtype=torch.float64), torch, torch.Tensor.detach
    loss, sums = reward_objective(values, 0.0, xp=lib, detach=detach)
    # -log σ(1) = 0.313262, -log σ(-1) = 1.313262
    assert float(loss) == pytest.approx(0.313262 + 1.313262, abs=1e-5)
    report = summarize(np.array(sums.tolist()))
    assert report["loss"] == pytest.approx((0.313262 + 1.313262) / 2, abs=1e-5)
    assert report["accuracy"] == 0.5 and report["margin"] == pytest.approx(0.0, abs=1e-6)
    assert report["rewards/chosen"] == pytest.approx(1.25) and report["rewards/rejected"] == pytest.approx(1.25)
    centred, _ = reward_objective(values, 0.1, xp=lib, detach=detach)  # + 0.1 * ((2 + 1)^2 + (0.5 + 1.5)^2)
    assert float(centred) == pytest.approx(0.313262 + 1.313262 + 0.1 * (9 + 4), abs=1e-5)


def test_a_tie_counts_half_and_a_win_counts_one():
    _, sums = reward_objective(np.array([1.0, 3.0, 1.0, 2.0]), 0.0, xp=np, detach=lambda x: x)
    assert summarize(sums)["accuracy"] == 0.75


def test_the_score_is_read_at_the_last_token_that_is_not_padding():
    ids = np.array([[5, 6, 7, 0, 0], [5, 6, 0, 0, 0], [5, 6, 7, 8, 9]])
    assert score_positions(ids, pad_id=0).tolist() == [2, 1, 4]
    # Pad token = end-of-sequence token: transformers skips the closing EOS too (its rightmost non-pad id).
    assert score_positions(np.array([[5, 6, 2, 2, 2]]), pad_id=2).tolist() == [1]
    with pytest.raises(UserError, match="all padding"):
        score_positions(np.array([[2, 2]]), pad_id=2)


# --- MIND pairs ------------------------------------------------------------------------------------


def test_mind_pairs_prefer_a_clicked_title_to_a_skipped_one_of_the_same_impression():
    folder = bundled("data/mind-sample")
    titles = dict(line.split("\t")[0:4:3] for line in (folder / "news.tsv").read_text().splitlines())
    first = (folder / "behaviors.tsv").read_text().splitlines()[0].split("\t")
    rows = [r for r in iter_preference_rows(folder, max_history=10) if r["impression_id"] == first[0]]
    # Impressions N20059-0 N87804-0 N56967-1 N37513-0 N96240-1 N77608-1 N60707-0 N51320-0: 3 clicked, 5 skipped.
    assert [(r["chosen"], r["rejected"]) for r in rows] == [
        (titles["N56967"], titles["N20059"]), (titles["N96240"], titles["N87804"]), (titles["N77608"], titles["N37513"])]
    history = first[3].split()  # all 9 History clicks, oldest first: the cap of 10 keeps them all
    assert rows[0]["prompt"].splitlines()[1] == "User Preference: " + ",".join(f'"{titles[n]}"' for n in history)
    assert all(r["prompt"] == rows[0]["prompt"] for r in rows)


# --- training ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_saved_reward_adapter_scores_the_same_in_transformers_with_peft(tiny_model_dir, tmp_path):
    torch = pytest.importorskip("torch")
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from mlxft.backends import engine_for
    from mlxft.methods import reward
    from mlxft.methods.reward import evaluate_pairs
    from mlxft.models.files import pad_id as pad_id_of

    config = tiny_config(tiny_model_dir, tmp_path / "run", "eval.every=0")
    summary = reward.train(config, Run.create(tmp_path / "run", config), echo=lambda *a: None)
    adapter = tmp_path / "run" / "last"
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["task_type"] == "SEQ_CLS" and saved["modules_to_save"] == ["score"]

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(line + "\n" for line in bundled("data/preference-sample.jsonl").read_text().splitlines()[:6]))
    ours = evaluate_pairs("mlx", str(tiny_model_dir), str(adapter), pairs)
    tokenizer, _ = engine_for("mlx").load_scorer(str(tiny_model_dir), str(adapter))
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1, pad_token_id=pad_id_of(tokenizer),
                                                              dtype=torch.float32)
    head_before = base.score.weight.detach().clone()
    model = PeftModel.from_pretrained(base, adapter).eval()
    assert not torch.equal(model.base_model.model.score.modules_to_save["default"].weight, head_before)

    from mlxft.data.dataset import preference_records
    from mlxft.data.encode import encode_preference_records
    from mlxft.data.records import load_records
    from mlxft.data.templates import resolve_preference_template

    records = preference_records(load_records(pairs), None)
    encoded, _ = encode_preference_records(records, resolve_preference_template("auto", records, tokenizer), tokenizer,
                                           max_length=1024, max_prompt_length=512, truncation_mode="keep_end")
    theirs = []
    with torch.no_grad():
        for pair in encoded:
            theirs.append([model(torch.tensor([pair.prompt_ids + answer])).logits.item()
                           for answer in (pair.chosen_ids, pair.rejected_ids)])
    difference = np.abs(np.array(theirs) - np.array(ours["scores"])).max()
    print(f"PEFT SEQ_CLS vs mlxft: largest score difference {difference:.1e}")
    assert difference < 1e-5  # measured: 4.6e-7 (float32 on both sides; the scores are ~1)
    assert np.abs(np.array(ours["scores"])).max() > 1e-3  # a head that scores something
    assert summary["load_with"].endswith("PeftModel.from_pretrained(model, adapter)")


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_resume_after_a_kill_reproduces_the_reports(tiny_model_dir, tmp_path, stop_after_step, backend):
    if backend == "torch":
        pytest.importorskip("peft")
    from mlxft.methods import reward

    train = partial(reward.train, backend=backend)
    straight = tiny_config(tiny_model_dir, tmp_path / "a")
    train(straight, Run.create(tmp_path / "a", straight), echo=lambda *a: None)
    killed = tiny_config(tiny_model_dir, tmp_path / "b")
    counter = stop_after_step(5)  # killed after step 5, with a checkpoint at step 3
    with pytest.raises(KeyboardInterrupt):
        train(killed, Run.create(tmp_path / "b", killed), echo=lambda *a: None)
    train(killed, Run.open_for_resume(tmp_path / "b"), resume=True, echo=lambda *a: None)
    assert counter["after_stop"] == 3
    a, b = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    for key in ("loss", "accuracy", "margin", "grad_norm", "eval_accuracy"):
        assert [r.get(key) for r in b] == pytest.approx([r.get(key) for r in a], rel=1e-5, abs=1e-7), key
    assert a[-1]["loss"] < a[0]["loss"]  # it learned: not two idle runs agreeing


def test_mistakes_are_one_line_errors(tiny_model_dir, tmp_path):
    from click.testing import CliRunner

    from mlxft.cli import cli

    runner = CliRunner()
    out = str(tmp_path / "run")
    full = runner.invoke(cli, ["reward", "--recipe", "reward", "--model", str(tiny_model_dir), "--out", out,
                               "--set", "lora.full_finetune=true"])
    assert full.exit_code != 0 and "full fine-tuning of a reward model is not built yet" in full.output
    metric = runner.invoke(cli, ["reward", "--recipe", "reward", "--model", str(tiny_model_dir), "--out", out,
                                 "--set", "eval.metric=auc"])
    assert metric.exit_code != 0 and "not a reward model metric" in metric.output
    assert not (tmp_path / "run").exists()  # nothing left behind


def test_a_reward_adapter_is_refused_where_a_language_model_adapter_is_expected(tmp_path):
    from mlxft.models.adapters import AdapterSpec, load_adapter, load_saved_modules, save_adapter

    lora = {"model.layers.0.self_attn.q_proj": (np.ones((2, 4), np.float32), np.zeros((4, 2), np.float32))}
    head = np.arange(4, dtype=np.float32)[None]
    save_adapter(tmp_path / "reward", AdapterSpec(2, 4, 0.0, ["q_proj"], "base", task_type="SEQ_CLS",
                                                   modules_to_save=["score"]), lora, {"score.weight": head})
    with pytest.raises(UserError, match="a reward model .* score with it through `mlxft eval reward`"):
        load_adapter(tmp_path / "reward")
    spec, weights = load_adapter(tmp_path / "reward", task_type=None)
    assert spec.modules_to_save == ["score"] and list(weights) == list(lora)
    assert load_saved_modules(tmp_path / "reward")["score.weight"].tolist() == head.tolist()
    # A language-model adapter that trains a whole module (PEFT's modules_to_save) would lose it silently.
    save_adapter(tmp_path / "lm", AdapterSpec(2, 4, 0.0, ["q_proj"], "base", modules_to_save=["lm_head"]), lora,
                 {"lm_head.weight": head})
    with pytest.raises(UserError, match="trains 'lm_head' in full"):
        load_adapter(tmp_path / "lm")
