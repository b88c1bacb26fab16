"""DPO (mlxft.methods.dpo) on the MLX engine with a 2-layer, 32-wide model: ln 2 at step 0, the losses against NumPy, the
reference as the adapter-off model, masks, memory, resume, the CLI and its errors."""

import json
import math
from functools import partial

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten

from mlxft.backends.mlx import lora, steps
from mlxft.backends.mlx import model as mlx_model
from mlxft.backends.mlx.model import load
from mlxft.cli import cli
from mlxft.config import DPOConfig, load_config
from mlxft.data.batching import collate_pairs, scored_targets
from mlxft.data.dataset import load_preference_splits
from mlxft.data.encode import PreferenceExample, encode_preference
from mlxft.data.records import Record
from mlxft.data.templates import render_preference
from mlxft.errors import UserError
from mlxft.losses.dpo import dpo_losses, summarize
from mlxft.methods import dpo
from mlxft.methods.dpo import REFERENCE_FILE
from mlxft.models.adapters import AdapterSpec, save_adapter
from mlxft.train.runs import Run

TRL_NAMES = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
             "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected"]


def tiny_config(model_dir, out, *extra):
    return load_config("dpo", [
        f"model.name={model_dir}", "data.k_shot=24", "data.max_valid_rows=8", "train.batch_size=4",
        "train.steps=6", "train.report_every=1", "train.warmup_steps=2", "train.learning_rate=1e-2",
        "train.checkpoint_every=3", "eval.every=0", "eval.generate_examples=1", "eval.max_new_tokens=4",
        "lora.dropout=0.0", f"out={out}", *extra])


def losses(run_dir):
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


def run_training(config, folder, **kwargs):
    return dpo.train(config, Run.create(folder, config), echo=lambda *a: None, **kwargs)


def random_pairs(n, seed=0, prompt=(5, 30), answer=(2, 12), vocab=500):
    rng = np.random.default_rng(seed)
    def ids(lo_hi):
        return rng.integers(3, vocab, size=int(rng.integers(*lo_hi))).tolist()

    return [PreferenceExample(ids(prompt), ids(answer), ids(answer)) for _ in range(n)]


def arrays_of(pb, shared=True):
    """A pair batch as the trainer lays it out: shared prompts (the default) or its 2B rows."""
    return steps.pair_arrays(pb.batch, 0, shared)


def adapted_model(model_dir, b_scale=0.0):
    model, _, _ = load(str(model_dir))
    mx.random.seed(0)
    lora.apply_lora(model, AdapterSpec(4, 8, 0.0, ["q_proj", "v_proj"], "x"))
    if b_scale:
        for layer in lora.lora_layers(model).values():
            layer.lora_b = mx.random.normal(layer.lora_b.shape) * b_scale
    return model


# --- the loss math ---------------------------------------------------------------------------------

def numpy_reference(pc, pr, rc, rr, beta, loss_type, eps):
    """The published formulas, written out once more without mlxft.losses.dpo."""
    d = (pc - rc) - (pr - rr)

    def logsig(x):
        return np.log(1 / (1 + np.exp(-x)))  # the naive form: fine at these magnitudes

    return {
        "sigmoid": -(1 - eps) * logsig(beta * d) - eps * logsig(-beta * d),
        "ipo": (d - 1 / (2 * beta)) ** 2,
        "hinge": np.maximum(0, 1 - beta * d),
        "robust": (-(1 - eps) * logsig(beta * d) + eps * logsig(-beta * d)) / (1 - 2 * eps),
    }[loss_type]


CASE = {"pc": np.array([-10.0, -4.0, -7.5]), "pr": np.array([-12.0, -3.0, -7.5]),
        "rc": np.array([-11.0, -4.0, -6.0]), "rr": np.array([-11.0, -3.5, -9.0])}


@pytest.mark.parametrize("loss_type, eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.1)])
@pytest.mark.parametrize("backend", ["numpy", "mlx"])
def test_losses_match_a_numpy_reference(loss_type, eps, backend):
    xp = np if backend == "numpy" else mx
    args = [xp.array(v) if backend == "mlx" else v for v in CASE.values()]
    got, chosen, rejected = dpo_losses(*args, beta=0.5, loss_type=loss_type, label_smoothing=eps, xp=xp)
    expected = numpy_reference(**CASE, beta=0.5, loss_type=loss_type, eps=eps)
    np.testing.assert_allclose(np.array(got), expected, rtol=1e-5)
    np.testing.assert_allclose(np.array(chosen), 0.5 * (CASE["pc"] - CASE["rc"]), rtol=1e-6)
    np.testing.assert_allclose(np.array(rejected), 0.5 * (CASE["pr"] - CASE["rr"]), rtol=1e-6)


def test_hand_computed_values():
    # beta * delta = ln 3, so sigmoid(beta * delta) = 3/4: the sigmoid loss is -ln(3/4).
    delta = math.log(3) / 0.1

    def one(delta=delta, **kw):
        return float(dpo_losses(np.array([delta]), np.array([0.0]), np.array([0.0]), np.array([0.0]), beta=0.1, xp=np, **kw)[0][0])

    assert one() == pytest.approx(-math.log(0.75), rel=1e-9)
    assert one(label_smoothing=0.1) == pytest.approx(-0.9 * math.log(0.75) - 0.1 * math.log(0.25), rel=1e-9)
    assert one(loss_type="ipo") == pytest.approx((delta - 5) ** 2, rel=1e-9)
    assert one(loss_type="hinge") == 0.0  # beta * delta = ln 3 > 1: past the margin
    assert one(5.0, loss_type="hinge") == pytest.approx(0.5, rel=1e-9)
    assert one(loss_type="robust", label_smoothing=0.1) == pytest.approx((-0.9 * math.log(0.75) + 0.1 * math.log(0.25)) / 0.8, rel=1e-9)


def test_reference_free_losses_by_hand():
    # SimPO: beta (mean log-prob margin 1) - gamma = 2 - 0.5 = 1.5. ORPO: p(chosen) = 1/2 (odds 1),
    # p(rejected) = 1/4 (odds 1/3): the odds ratio is 3, so the loss is -ln(1/2) - beta ln sigmoid(ln 3).
    def one(chosen, rejected, **kw):
        out = dpo_losses(np.array([chosen]), np.array([rejected]), np.array([9.0]), np.array([-9.0]), xp=np, **kw)
        return [float(v[0]) for v in out]

    loss, chosen_reward, rejected_reward = one(-1.0, -2.0, beta=2.0, loss_type="simpo", simpo_gamma=0.5)
    assert loss == pytest.approx(math.log1p(math.exp(-1.5)), rel=1e-9)
    assert (chosen_reward, rejected_reward) == (-2.0, -4.0)  # beta * log p; the reference (9, -9) plays no part
    loss, *_ = one(math.log(0.5), math.log(0.25), beta=0.2, loss_type="orpo")
    assert loss == pytest.approx(math.log(2) - 0.2 * math.log(0.75), rel=1e-9)
    torch = pytest.importorskip("torch")
    chosen, rejected = [-1.3, -0.2], [-0.2, -1.3]
    for loss_type in ("simpo", "orpo"):
        expected = dpo_losses(np.array(chosen), np.array(rejected), *[np.zeros(2)] * 2, beta=0.3, loss_type=loss_type, xp=np)[0]
        for xp, array in ((mx, mx.array), (torch, torch.tensor)):
            got = dpo_losses(array(chosen), array(rejected), *[array([0.0, 0.0])] * 2, beta=0.3, loss_type=loss_type, xp=xp)[0]
            np.testing.assert_allclose(np.array(got.tolist()), expected, rtol=1e-6)


def test_torch_computes_the_same_losses():
    torch = pytest.importorskip("torch")
    got = dpo_losses(*(torch.tensor(v) for v in CASE.values()), beta=0.5, loss_type="robust", label_smoothing=0.1, xp=torch)[0]
    np.testing.assert_allclose(got.numpy(), numpy_reference(**CASE, beta=0.5, loss_type="robust", eps=0.1), rtol=1e-6)


def test_bad_loss_settings_are_user_errors():
    for settings, message in [({"loss_type": "bco_pair"}, "loss_type must be one of"), ({"beta": 0.0}, "beta must be positive"),
                              ({"label_smoothing": 0.5}, "label_smoothing must be in"),
                              ({"loss_type": "hinge", "label_smoothing": 0.1}, "not hinge"),
                              ({"max_length": 64, "max_prompt_length": 64}, "must be below dpo.max_length")]:
        with pytest.raises(UserError, match=message):
            DPOConfig(**settings).check()


# --- masks -----------------------------------------------------------------------------------------

def test_prompt_tokens_are_never_scored(char_tokenizer):
    BOS, EOS, c = 1, 2, lambda s: [ord(ch) + 3 for ch in s]
    from mlxft.data.templates import PreferencePrompted

    pair, _ = encode_preference(PreferencePrompted("ab", "x", "yz"), char_tokenizer)
    batch = collate_pairs([pair], [0], pad_id=0).batch
    assert batch.input_ids.tolist() == [[BOS, *c("abx"), EOS, 0], [BOS, *c("abyz"), EOS]]
    assert batch.loss_mask.tolist() == [[0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1]]
    targets = scored_targets(batch)
    assert targets.positions.tolist() == [[2, 3, 0, 0], [2, 3, 4, 0]]  # the outputs that predict x, EOS / y, z, EOS
    assert targets.tokens.tolist() == [[*c("x"), EOS, 0, 0], [*c("yz"), EOS, 0]]
    assert targets.weights.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0]]


@pytest.mark.parametrize("shared", [True, False], ids=["shared-prompts", "rows"])
def test_sequence_logps_sum_the_answer_tokens_only(tiny_model_dir, shared):
    model = adapted_model(tiny_model_dir, b_scale=0.5)
    pairs = random_pairs(3, seed=1)
    pb = collate_pairs(pairs, range(3), pad_id=0)
    logps = np.array(steps.sequence_logps(model, arrays_of(pb, shared), split_head=True)[0])
    logits = model(mx.array(pb.batch.input_ids)).astype(mx.float32)
    full = np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
    for row, (pair, answer) in enumerate([(p, p.chosen_ids) for p in pairs] + [(p, p.rejected_ids) for p in pairs]):
        start = len(pair.prompt_ids)
        expected = sum(full[row, start + i - 1, token] for i, token in enumerate(answer))
        assert logps[row] == pytest.approx(expected, rel=1e-4)


def test_shared_prompts_give_the_gradients_of_the_rows(tiny_model_dir):
    # Pairs whose answers share their first tokens, of unequal lengths, and one pair that a cut
    # left without a prompt: what is scored, and every gradient, must be those of the 2B rows.
    pairs = random_pairs(4, seed=7)
    pairs[1] = PreferenceExample(pairs[1].prompt_ids, [9, 9, *pairs[1].chosen_ids], [9, 9, *pairs[1].rejected_ids])
    pairs[2] = PreferenceExample([], pairs[2].chosen_ids, pairs[2].rejected_ids)
    pb = collate_pairs(pairs, range(4), pad_id=0)
    model = adapted_model(tiny_model_dir, b_scale=0.5)
    micro_step, _ = steps.make_step(model, optim.SGD(learning_rate=0.0), partial(steps.pair_loss, split_head=True, dc=DPOConfig(beta=0.5)), None)
    reference = mx.array(np.linspace(-60, -20, 8, dtype=np.float32))  # pairs far from a tie: real gradients
    results = {shared: micro_step(arrays_of(pb, shared), reference) for shared in (True, False)}
    (shared_grads, shared_sums), (row_grads, row_sums) = results[True], results[False]
    np.testing.assert_allclose(np.array(shared_sums), np.array(row_sums), rtol=1e-5)
    for (key, g), (_, h) in zip(tree_flatten(shared_grads), tree_flatten(row_grads)):
        scale = np.abs(np.array(h)).max()
        assert scale > 0, key
        np.testing.assert_allclose(np.array(g), np.array(h), atol=1e-5 * scale, err_msg=key)
    # The model outside the shared forward is the model as it was: its rotary embeddings are back.
    assert all(type(layer.self_attn.rope).__name__ != "_RestartedRoPE" for layer in model.model.layers)
    assert "rope" in model.model.layers[0].self_attn


FAMILY_ARGS = dict(hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                   rms_norm_eps=1e-5, vocab_size=100, head_dim=8, max_position_embeddings=256, tie_word_embeddings=True,
                   rope_theta=10000.0)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "phi3", "smollm3", "olmo2"])
def test_every_family_that_shares_prompts_scores_as_its_rows(family, tmp_path):
    # Each mlx-lm class mlxft shares prompts on, tiny and random: its own attention, rotary
    # embedding (Phi-3's, SmolLM3's layers without one) and head, through the shared layout.
    import importlib

    module = importlib.import_module(f"mlx_lm.models.{family}")
    model = module.Model(module.ModelArgs.from_dict({**FAMILY_ARGS, "model_type": family}))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": family}))
    assert mlx_model.can_share_prompts(model, tmp_path)
    pb = collate_pairs(random_pairs(3, vocab=100), range(3), pad_id=0)  # the tiny models' vocabulary
    shared, rows = (np.array(steps.sequence_logps(model, arrays_of(pb, s), True)[0]) for s in (True, False))
    np.testing.assert_allclose(shared, rows, rtol=1e-5)


def test_a_model_that_keeps_its_blocks_elsewhere_does_not_share_prompts(tmp_path):
    # GPT-2 in mlx-lm keeps its blocks in model.model.h: no shared prompts, and no error asking why.
    from mlx_lm.models import gpt2

    model = gpt2.Model(gpt2.ModelArgs(model_type="gpt2", n_ctx=64, n_embd=32, n_head=2, n_layer=2, n_positions=64,
                                      layer_norm_epsilon=1e-5, vocab_size=100))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert not mlx_model.can_share_prompts(model, tmp_path) and not mlx_model.can_pack(model, tmp_path)


def test_gradient_checkpointing_runs_the_rows(tiny_model_dir, tmp_path):
    # Its backward pass recomputes the blocks after the shared forward has ended: so no sharing,
    # in that run and for every later model of the same class (mlx-lm patches the class).
    summary = run_training(tiny_config(tiny_model_dir, tmp_path / "a", "train.steps=2", "train.grad_checkpoint=true"), tmp_path / "a")
    assert summary["shared_prompts"] is False
    assert not mlx_model.can_share_prompts(adapted_model(tiny_model_dir), tiny_model_dir)
    assert run_training(tiny_config(tiny_model_dir, tmp_path / "b", "train.steps=2"), tmp_path / "b")["shared_prompts"] is False


# --- the reference ---------------------------------------------------------------------------------

def test_step_zero_loss_is_ln2_and_rewards_are_zero(tiny_model_dir):
    model = adapted_model(tiny_model_dir)  # B = 0: the adapter changes nothing yet
    pb = collate_pairs(random_pairs(6), range(6), pad_id=0)
    arrays = arrays_of(pb)
    reference = steps.make_reference_step(model, split_head=True)(arrays)
    micro_step, _ = steps.make_step(model, optim.SGD(learning_rate=0.0), partial(steps.pair_loss, split_head=True, dc=DPOConfig()), None)
    grads, sums = micro_step(arrays, reference)
    metrics = summarize(np.array(sums))
    assert metrics["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["rewards/chosen"] == 0.0 and metrics["rewards/rejected"] == 0.0 and metrics["rewards/margins"] == 0.0
    assert metrics["rewards/accuracies"] == 0.5  # every pair a tie
    assert any(np.abs(np.array(g)).sum() > 0 for _, g in tree_flatten(grads))  # and yet B gets a gradient


@pytest.mark.parametrize("shared", [True, False], ids=["shared-prompts", "rows"])
def test_reference_is_the_base_model_inside_the_compiled_steps(tiny_model_dir, shared):
    model = adapted_model(tiny_model_dir, b_scale=0.5)  # an adapter that changes the outputs
    model.train()
    pb = collate_pairs(random_pairs(4), range(4), pad_id=0)
    arrays = arrays_of(pb, shared)
    micro_step, _ = steps.make_step(model, optim.SGD(learning_rate=0.0), partial(steps.pair_loss, split_head=True, dc=DPOConfig()), None)
    reference_step = steps.make_reference_step(model, split_head=True)
    first = np.array(micro_step(arrays, mx.zeros(8))[1])  # the step traced before the reference
    reference = reference_step(arrays)

    base, _, _ = load(str(tiny_model_dir))
    np.testing.assert_allclose(np.array(reference), np.array(steps.sequence_logps(base, arrays, True)[0]), rtol=1e-5)
    policy = np.array(steps.sequence_logps(model, arrays, True)[0])
    assert np.abs(policy - np.array(reference)).max() > 1e-2  # the adapter is on again outside the reference
    # Both compiled functions, called again in either order, keep their own view of the adapter.
    np.testing.assert_array_equal(np.array(micro_step(arrays, mx.zeros(8))[1]), first)
    np.testing.assert_allclose(np.array(reference_step(arrays)), np.array(reference), rtol=1e-6)
    assert all(layer.scale == 2.0 for layer in lora.lora_layers(model).values()) and model.training


def test_peak_memory_of_a_dpo_step_is_that_of_an_sft_step(tiny_model_dir):
    # The same 2B rows as an SFT batch and as a DPO batch (its prompts shared), on the same
    # model: the reference costs time (one forward), not memory. Second calls: the first ones
    # also compile.
    model = adapted_model(tiny_model_dir)
    pb = collate_pairs(random_pairs(8, prompt=(40, 60), answer=(10, 20)), range(8), pad_id=0, pad_to_multiple=16)
    rows, arrays = arrays_of(pb, shared=False), arrays_of(pb)
    rows = (rows["inputs"], rows["positions"], rows["tokens"], rows["weights"])
    sft_micro, sft_update = steps.make_step(model, optim.AdamW(learning_rate=1e-4), partial(steps.sft_loss, split_head=True), 1.0)
    dpo_optimizer = optim.AdamW(learning_rate=1e-4)
    dpo_micro, dpo_update = steps.make_step(model, dpo_optimizer, partial(steps.pair_loss, split_head=True, dc=DPOConfig()), 1.0)
    reference_step = steps.make_reference_step(model, True)

    def sft_step():
        grads, sums = sft_micro(*rows)
        mx.eval(model.state, sft_update(grads, sums[0]))

    def dpo_step():
        reference = reference_step(arrays)
        mx.eval(reference)
        grads, sums = dpo_micro(arrays, reference)
        mx.eval(model.state, dpo_update(grads, sums[0]))

    peaks = {}
    for name, step in [("sft", sft_step), ("dpo", dpo_step)] * 2:
        step()
        mx.reset_peak_memory()
        step()
        peaks[name] = mx.get_peak_memory()
    print(f"peak memory: SFT step {peaks['sft'] / 1e6:.2f} MB, DPO step {peaks['dpo'] / 1e6:.2f} MB")
    assert peaks["sft"] > 0 and peaks["dpo"] <= 1.10 * peaks["sft"]


def test_accumulation_equals_one_big_batch_weighted_by_pairs(tiny_model_dir):
    def gradients(batches):
        model = adapted_model(tiny_model_dir, b_scale=0.1)
        micro_step, _ = steps.make_step(model, optim.SGD(learning_rate=0.0), partial(steps.pair_loss, split_head=True, dc=DPOConfig()), None)
        reference_step = steps.make_reference_step(model, True)
        total, summed = None, None
        for pb in batches:
            arrays = arrays_of(pb)
            grads, sums = micro_step(arrays, reference_step(arrays))
            flat = {k: np.array(v) for k, v in tree_flatten(grads)}
            summed = flat if summed is None else {k: summed[k] + flat[k] for k in flat}
            total = np.array(sums) if total is None else total + np.array(sums)
        return summarize(total)["loss"], {k: v / total[0] for k, v in summed.items()}

    pairs = random_pairs(7, seed=3)
    one_loss, one_grads = gradients([collate_pairs(pairs, range(7), 0)])
    acc_loss, acc_grads = gradients([collate_pairs(pairs[i:i + 3], range(i, min(i + 3, 7)), 0) for i in range(0, 7, 3)])
    assert acc_loss == pytest.approx(one_loss, rel=1e-5)
    for key in one_grads:
        np.testing.assert_allclose(acc_grads[key], one_grads[key], rtol=1e-4, atol=1e-7)


# --- runs ------------------------------------------------------------------------------------------

def test_resume_after_a_kill_reproduces_the_losses(tiny_model_dir, tmp_path, stop_after_step):
    run_training(tiny_config(tiny_model_dir, tmp_path / "a"), tmp_path / "a")
    uninterrupted = losses(tmp_path / "a")
    assert uninterrupted[0] == pytest.approx(math.log(2), abs=1e-5) and uninterrupted[-1] < uninterrupted[0]

    killed = tiny_config(tiny_model_dir, tmp_path / "b")
    steps = stop_after_step(5)  # killed after step 5, with a checkpoint at step 3
    with pytest.raises(KeyboardInterrupt):
        run_training(killed, tmp_path / "b")
    assert json.loads((tmp_path / "b/checkpoint/state.json").read_text())["step"] == 3

    dpo.train(killed, Run.open_for_resume(tmp_path / "b"), resume=True, echo=lambda *a: None)
    assert steps["after_stop"] == 3  # steps 4 to 6, and only those
    assert losses(tmp_path / "b") == pytest.approx(uninterrupted, rel=1e-5)


def test_precomputed_reference_gives_the_same_run(tiny_model_dir, tmp_path):
    run_training(tiny_config(tiny_model_dir, tmp_path / "a", "train.steps=3", "eval.generate_examples=0"), tmp_path / "a")
    summary = run_training(tiny_config(tiny_model_dir, tmp_path / "b", "train.steps=3", "eval.generate_examples=0",
                                       "dpo.precompute_reference=true"), tmp_path / "b")
    assert (tmp_path / "b" / REFERENCE_FILE).exists() and not (tmp_path / "a" / REFERENCE_FILE).exists()
    assert losses(tmp_path / "b") == pytest.approx(losses(tmp_path / "a"), rel=1e-5)
    assert summary["reference"] == "base model"


def test_a_run_with_shared_prompts_is_the_run_of_the_rows(tiny_model_dir, tmp_path):
    runs = {shared: run_training(tiny_config(tiny_model_dir, tmp_path / str(shared), "train.steps=3", "eval.generate_examples=0",
                                             f"dpo.share_prompt={str(shared).lower()}"), tmp_path / str(shared))
            for shared in (True, False)}
    assert runs[True]["shared_prompts"] is True and runs[False]["shared_prompts"] is False
    assert losses(tmp_path / "True") == pytest.approx(losses(tmp_path / "False"), rel=1e-5)
    assert runs[True]["after"]["eval_loss"] == pytest.approx(runs[False]["after"]["eval_loss"], rel=1e-5)
    assert runs[True]["trained_tokens"] == runs[False]["trained_tokens"]  # tokens count the rows either way


def test_continuing_an_adapter_makes_it_the_reference(tiny_model_dir, tmp_path):
    rng = np.random.default_rng(0)
    weights = {f"model.layers.{i}.self_attn.{m}": (rng.normal(size=(4, 32)) * 0.2, rng.normal(size=(32, 4)) * 0.2)
               for i in range(2) for m in ("q_proj", "k_proj")}
    save_adapter(tmp_path / "sft", AdapterSpec(4, 8, 0.0, ["q_proj", "k_proj"], str(tiny_model_dir)), weights)
    summary = run_training(tiny_config(tiny_model_dir, tmp_path / "run", "train.steps=1", "eval.generate_examples=0"),
                           tmp_path / "run", adapter=str(tmp_path / "sft"))
    assert summary["before"]["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at the start
    assert summary["before"]["eval_rewards/margins"] == 0.0
    assert summary["reference"] == f"base model + adapter {tmp_path / 'sft'}"
    assert json.loads((tmp_path / "run/last/adapter_config.json").read_text())["target_modules"] == ["q_proj", "k_proj"]


def test_cli_end_to_end_writes_trl_metrics_and_the_comparison(tiny_model_dir, tmp_path):
    result = CliRunner().invoke(cli, [
        "dpo", "--recipe", "dpo", "--backend", "mlx", "--model", str(tiny_model_dir), "--out", str(tmp_path / "run"),
        "--set", "train.steps=4", "--set", "train.batch_size=4", "--set", "data.k_shot=16", "--set", "data.max_valid_rows=8",
        "--set", "eval.every=2", "--set", "eval.generate_examples=2", "--set", "eval.max_new_tokens=4",
        "--set", "train.checkpoint_every=2"])
    assert result.exit_code == 0, result.output
    assert "validation rewards/accuracies: 0.5000 ->" in result.output and "comparison.md" in result.output
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    for part in ("before", "after"):
        assert set(summary[part]) == {"eval_loss", *(f"eval_{name}" for name in TRL_NAMES)}
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    record = records[0]  # step 2: trained and evaluated
    assert {"loss", "learning_rate", "grad_norm", "tokens_per_second", "peak_memory_gb", *TRL_NAMES,
            *(f"eval_{name}" for name in TRL_NAMES)} <= set(record)
    comparison = json.loads((tmp_path / "run/comparison.json").read_text())
    assert len(comparison["items"]) == 2 and {"prompt", "before", "after", "chosen", "rejected"} <= set(comparison["items"][0])
    markdown = (tmp_path / "run/comparison.md").read_text()
    assert markdown.startswith("# Before and after DPO") and "| before (base model, adapter off) | after DPO |" in markdown
    for name in ("last/adapter_model.safetensors", "checkpoint/state.json", "config.yaml"):
        assert (tmp_path / "run" / name).exists(), name


def test_cli_rejects_rows_that_are_not_pairs(tiny_model_dir, tmp_path):
    rows = tmp_path / "alpaca.jsonl"
    rows.write_text(json.dumps({"instruction": "Say hi.", "output": "Hi."}) + "\n")
    opposing = tmp_path / "opposing.jsonl"
    opposing.write_text(json.dumps({"prompt": "Tea?", "support": "Yes.", "oppose": "No."}) + "\n")
    for data, message in [(rows, "DPO needs rows with prompt, chosen and rejected"), (opposing, "need a support ratio")]:
        result = CliRunner().invoke(cli, ["dpo", "--recipe", "dpo", "--model", str(tiny_model_dir), "--data", str(data),
                                          "--out", str(tmp_path / "run")])
        assert result.exit_code == 2, result.output
        lines = result.output.strip().splitlines()
        assert lines == [lines[-1]] and lines[-1].startswith("error: ") and message in lines[-1], result.output
        assert not (tmp_path / "run").exists()


# --- data ------------------------------------------------------------------------------------------

def test_opposing_rows_become_pairs_by_the_support_ratio(tmp_path):
    path = tmp_path / "opposing.jsonl"
    path.write_text("".join(json.dumps({"id": i, "prompt": f"Q{i}?", "support": f"yes {i}", "oppose": f"no {i}"}) + "\n"
                            for i in range(10)))
    config = load_config("dpo", [f"data.source={path}", "data.split=[1,0,0]"])
    splits = load_preference_splits(config.data, support_ratio=0.3)
    by_id = {r["id"]: r for r in splits.train}
    assert [by_id[i]["chosen"] for i in range(10)] == [f"yes {i}" for i in range(3)] + [f"no {i}" for i in range(3, 10)]
    assert by_id[4].origin == f"{path}:5" and splits.template == "auto"  # chat or plain: the tokenizer decides


def test_auto_puts_string_prompts_through_the_chat_template_when_the_model_has_one(char_tokenizer):
    # An instruct model answers a bare "What is 44 plus 39?" with its end-of-turn token at once.
    row = Record({"prompt": "What is 44 plus 39?", "chosen": "83", "rejected": "84"}, "x.jsonl:1")
    prompted = render_preference(row, "auto", char_tokenizer)
    assert prompted.prompt == "<|user|>\nWhat is 44 plus 39?<|end|>\n<|assistant|>\n" and prompted.chosen == "83<|end|>\n"

    class BaseTokenizer(type(char_tokenizer)):
        chat_template = None

    assert render_preference(row, "auto", BaseTokenizer()).prompt == "What is 44 plus 39?"
    assert render_preference(row, "plain", char_tokenizer).prompt == "What is 44 plus 39?"  # always overridable


def test_conversational_rows_and_system_prompts_go_through_the_chat_template(char_tokenizer):
    row = Record({"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello"}],
                  "rejected": [{"role": "assistant", "content": "go"}], "system": "be kind"}, "x.jsonl:1")
    prompted = render_preference(row, "chat", char_tokenizer)
    assert prompted.prompt == "<|system|>\nbe kind<|end|>\n<|user|>\nhi<|end|>\n<|assistant|>\n"
    assert (prompted.chosen, prompted.rejected) == ("hello<|end|>\n", "go<|end|>\n")
    plain = render_preference(Record({"prompt": "hi", "chosen": "a", "rejected": "b"}, "x"), "plain", system_prompt="be kind")
    assert plain.prompt == "be kind\n\nhi"


def test_long_prompts_and_answers_are_cut_and_counted(char_tokenizer, tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in [
        {"prompt": "abcdefgh", "chosen": "x", "rejected": "y"},  # prompt over 6: keeps its end
        {"prompt": "ab", "chosen": "stuvwxyz", "rejected": "z"},  # chosen + EOS over 10 - 3
        {"prompt": "ab", "chosen": "x", "rejected": "y"},
    ]))
    config = load_config("dpo", [f"data.source={path}", "data.split=[1,0,0]", "dpo.max_prompt_length=6", "dpo.max_length=10",
                                 "data.template=plain"])
    splits = load_preference_splits(config.data)
    from mlxft.data.dataset import encode_preference_split

    pairs, report = encode_preference_split(splits.train, splits, char_tokenizer, config.data, config.dpo)
    assert report.truncated == 2 and report.kept == 3 and "2 truncated" in report.summary()
    by_prompt = {char_tokenizer.decode(p.prompt_ids): p for p in pairs}
    assert "cdefgh" in by_prompt and len(by_prompt["<s>ab"].chosen_ids) == 7  # 10 - BOS, a, b


def test_empty_answers_are_counted_and_flagged_in_the_comparison(tmp_path):
    from mlxft.methods.dpo import write_comparison

    rows = [Record({"prompt": "What is 44 plus 39?", "chosen": "83", "rejected": "84"}, "p.jsonl:1"),
            Record({"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "No."}, "p.jsonl:2")]
    config = load_config("dpo", ["data.template=plain"])
    report = write_comparison(tmp_path, rows, ["", "Red."], [" \n", "Blue."], config, None, 3)
    assert report["empty_answers"] == {"before": 1, "after": 1}
    markdown = (tmp_path / "comparison.md").read_text()
    assert "**Empty answers: 1 of 2 before, 1 after.**" in markdown and "data.template: plain" in markdown
    assert json.loads((tmp_path / "comparison.json").read_text())["empty_answers"] == {"before": 1, "after": 1}
    write_comparison(tmp_path, rows, ["A.", "B."], ["C.", "D."], config, None, 3)
    assert "Empty answers" not in (tmp_path / "comparison.md").read_text()


def test_kto_losses_by_hand():
    from mlxft.losses.dpo import kto_losses

    # Rows: a desirable answer with r = 0.5, an undesirable one with r = -0.5; the mismatched
    # answers' ratios 1.0 and 0.5 give z0 = 0.75 (not differentiated).
    losses, rewards, z0 = kto_losses(np.array([-1.0, -2.0]), np.array([-3.0, -3.0]), np.array([-1.5, -1.5]),
                                     np.array([-4.0, -3.5]), np.array([1.0, 0.0]), beta=0.1, desirable_weight=2.0,
                                     xp=np, detach=lambda x: x)
    # 2 * (1 - σ(0.1 * (0.5 - 0.75))) and 1 - σ(0.1 * (0.75 + 0.5))
    assert losses.tolist() == pytest.approx([1.0124993, 0.4687906], abs=1e-6)
    assert rewards.tolist() == pytest.approx([0.05, -0.05]) and float(z0) == pytest.approx(0.75)
    # z0 is clamped at 0: mismatched answers the policy likes less than the reference does say nothing
    _, _, clamped = kto_losses(np.array([0.0]), np.array([-5.0]), np.array([0.0]), np.array([-1.0]), np.array([1.0]),
                               beta=0.1, xp=np, detach=lambda x: x)
    assert float(clamped) == 0.0


def test_kto_rows_and_pairs_become_rows_with_a_mismatched_answer(tmp_path):
    from mlxft.data.dataset import kto_pairs, unpaired_records
    from mlxft.data.records import Record

    pairs = [Record({"prompt": "p1", "chosen": "good 1", "rejected": "bad 1"}, "a:1"),
             Record({"prompt": "p2", "chosen": "good 2", "rejected": "bad 2"}, "a:2")]
    rows = unpaired_records(pairs)
    assert [(r["prompt"], r["completion"], r["label"]) for r in rows] == [
        ("p1", "good 1", True), ("p1", "bad 1", False), ("p2", "good 2", True), ("p2", "bad 2", False)]
    laid_out = kto_pairs(rows)
    assert [(r["chosen"], r["rejected"]) for r in laid_out] == [
        ("good 1", "bad 1"), ("bad 1", "good 2"), ("good 2", "bad 2"), ("bad 2", "good 1")]
    with pytest.raises(UserError, match="'label' must be true"):
        unpaired_records([Record({"prompt": "p", "completion": "c", "label": "yes"}, "b:1")])
