"""DPO (mlxft.methods.dpo) on the PyTorch engine against the MLX one, on a 2-layer, 32-wide Llama: ln 2 at step 0, the reference
as the adapter-off model, the same losses and TRL metrics on the same weights for every loss type,
the same optimizer steps, the CLI end to end with the MLX run's summary keys, and resume."""

import json
import math
from functools import partial

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from mlx.utils import tree_flatten

from mlxft.backends.mlx import lora as mlx_lora
from mlxft.backends.mlx import model as mlx_model
from mlxft.backends.mlx import steps as mlx_steps
from mlxft.backends.torch import lora as torch_lora
from mlxft.backends.torch import model as torch_model
from mlxft.backends.torch import steps as torch_steps
from mlxft.backends.torch.adamw import MLXAdamW
from mlxft.cli import cli
from mlxft.config import DPOConfig, load_config
from mlxft.data.batching import collate_pairs
from mlxft.data.encode import PreferenceExample
from mlxft.losses.dpo import summarize
from mlxft.methods import dpo
from mlxft.methods.dpo import REFERENCE_FILE
from mlxft.models.adapters import AdapterSpec, save_adapter
from mlxft.train.runs import Run
from mlxft.train.schedule import learning_rate

CPU = torch.device("cpu")
SPEC = AdapterSpec(4, 8, 0.0, ["q_proj", "v_proj"], "x")


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """On these tiny models torch's threads cost more in synchronisation than they save (see
    test_torch_engine.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_pairs(n, seed=0, prompt=(5, 30), answer=(2, 12), vocab=500):
    rng = np.random.default_rng(seed)
    def ids(lo_hi):
        return rng.integers(3, vocab, size=int(rng.integers(*lo_hi))).tolist()

    return [PreferenceExample(ids(prompt), ids(answer), ids(answer)) for _ in range(n)]


def tensors_of(pb, shared=True):
    """A pair batch as the trainer lays it out: shared prompts (the default) or its 2B rows."""
    return torch_steps.pair_tensors(pb.batch, 0, shared, CPU)


def arrays_of(pb, shared=True):
    return mlx_steps.pair_arrays(pb.batch, 0, shared)


def torch_micro_step(model, tensors, reference, dc):
    """The PyTorch DPO step's forward and backward of one micro-batch; its STATISTICS sums."""
    loss_sum, sums = torch_steps.pair_loss(model, tensors, reference, split_head=True, dc=dc)
    loss_sum.backward()
    return sums


def twin_models(model_dir, b_scale=0.0, seed=0):
    """The same adapted weights on both backends: MLX's random A (and B, when b_scale), copied into PEFT."""
    m, _, _ = mlx_model.load(str(model_dir))
    mx.random.seed(seed)
    mlx_lora.apply_lora(m, SPEC)
    if b_scale:
        for layer in mlx_lora.lora_layers(m).values():
            layer.lora_b = mx.random.normal(layer.lora_b.shape) * b_scale
    t, _, _ = torch_model.load(str(model_dir), device=CPU)
    torch_lora.apply_lora(t, SPEC)
    torch_lora.set_adapter_weights(t, mlx_lora.adapter_weights(m))
    return m, t


def torch_grads(model):
    """{MLX parameter path: gradient in MLX's orientation} of the torch model's LoRA tensors."""
    grads = {}
    for path, layer in torch_lora.lora_layers(model).items():
        grads[f"{path}.lora_a"] = layer.lora_A["default"].weight.grad.numpy().T
        grads[f"{path}.lora_b"] = layer.lora_B["default"].weight.grad.numpy().T
    return grads


def losses(run_dir):
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


# --- the reference ---------------------------------------------------------------------------------

def test_step_zero_loss_is_ln2_and_rewards_are_zero(tiny_model_dir):
    _, model = twin_models(tiny_model_dir)  # B = 0, dropout 0: the adapter changes nothing yet
    model.train()
    tensors = tensors_of(collate_pairs(random_pairs(6), range(6), pad_id=0))
    reference = torch_steps.reference_logps(model, tensors, split_head=True)
    sums = torch_micro_step(model, tensors, reference, DPOConfig())
    metrics = summarize(sums.numpy())
    assert metrics["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["rewards/chosen"] == 0.0 and metrics["rewards/rejected"] == 0.0 and metrics["rewards/margins"] == 0.0
    assert metrics["rewards/accuracies"] == 0.5  # every pair a tie
    assert metrics["logps/chosen"] < -10  # real log-probs, not zeros
    assert all(layer.lora_B["default"].weight.grad.abs().sum() > 0 for layer in torch_lora.lora_layers(model).values())


@pytest.mark.parametrize("shared", [True, False], ids=["shared-prompts", "rows"])
def test_reference_is_the_base_model_with_the_adapter_off(tiny_model_dir, shared):
    _, model = twin_models(tiny_model_dir, b_scale=0.5)  # an adapter that changes the outputs
    model.train()
    tensors = tensors_of(collate_pairs(random_pairs(4), range(4), pad_id=0), shared)
    reference = torch_steps.reference_logps(model, tensors, split_head=True)
    assert not reference.requires_grad
    base, _, _ = torch_model.load(str(tiny_model_dir), device=CPU)
    with torch.no_grad():
        expected = torch_steps.sequence_logps(base.eval(), tensors, True)[0]
        policy = torch_steps.sequence_logps(model, tensors, True)[0]
    np.testing.assert_allclose(reference.numpy(), expected.numpy(), rtol=1e-6)
    assert (policy - reference).abs().max() > 1e-2  # the adapter is on again afterwards, trainable, in training mode
    assert model.training and torch_lora.trainable_parameters(model) == 2 * 2 * 4 * (32 + 32)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_shared_prompts_give_the_gradients_of_the_rows(tiny_model_dir, attention):
    # Answers that share their first tokens, and a pair a cut left without a prompt. Both of
    # transformers' attentions that take a custom mask: sdpa a boolean one, eager an additive one.
    pairs = random_pairs(4, seed=7)
    pairs[1] = PreferenceExample(pairs[1].prompt_ids, [9, 9, *pairs[1].chosen_ids], [9, 9, *pairs[1].rejected_ids])
    pairs[2] = PreferenceExample([], pairs[2].chosen_ids, pairs[2].rejected_ids)
    pb = collate_pairs(pairs, range(4), pad_id=0)
    _, model = twin_models(tiny_model_dir, b_scale=0.5)
    model.set_attn_implementation(attention)
    assert torch_model.can_share_prompts(model, tiny_model_dir)
    model.train()
    reference = torch.linspace(-60, -20, 8)  # pairs far from a tie: real gradients
    results = {}
    for shared in (True, False):
        model.zero_grad(set_to_none=True)
        sums = torch_micro_step(model, tensors_of(pb, shared), reference, DPOConfig(beta=0.5))
        results[shared] = sums.numpy(), torch_grads(model)
    (shared_sums, shared_grads), (row_sums, row_grads) = results[True], results[False]
    np.testing.assert_allclose(shared_sums, row_sums, rtol=1e-5)
    for key in row_grads:
        scale = np.abs(row_grads[key]).max()
        assert scale > 0, key
        np.testing.assert_allclose(shared_grads[key], row_grads[key], atol=1e-5 * scale, err_msg=key)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral", "phi3", "smollm3", "olmo2"])
def test_every_family_that_shares_prompts_scores_as_its_rows(family, tmp_path):
    # Each transformers class mlxft shares prompts on, tiny and random, with its own attention,
    # rotary embedding and head (Mistral without a sliding window: with one it runs the rows).
    import transformers

    config = transformers.AutoConfig.for_model(
        family, hidden_size=32, num_hidden_layers=2, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
        rms_norm_eps=1e-5, vocab_size=100, head_dim=8, max_position_embeddings=256, tie_word_embeddings=True, pad_token_id=0,
        **({"sliding_window": None} if family == "mistral" else {}))
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    (tmp_path / "config.json").write_text(json.dumps({"model_type": family}))
    assert torch_model.can_share_prompts(model, tmp_path)
    pb = collate_pairs(random_pairs(3, vocab=100), range(3), pad_id=0)  # the tiny models' vocabulary
    with torch.no_grad():
        shared, rows = (torch_steps.sequence_logps(model, tensors_of(pb, s), True)[0].numpy() for s in (True, False))
    np.testing.assert_allclose(shared, rows, rtol=1e-5)
    if family == "mistral":
        model.config.sliding_window = 4096  # Mistral 7B v0.1's: the mask handed over would drop the window
        assert not torch_model.can_share_prompts(model, tmp_path)


# --- MLX == PyTorch --------------------------------------------------------------------------------

SETTINGS = {"sigmoid": {}, "sigmoid-smoothed": {"label_smoothing": 0.2}, "ipo": {"loss_type": "ipo"},
            "hinge": {"loss_type": "hinge"}, "robust": {"loss_type": "robust", "label_smoothing": 0.1},
            "sigmoid-mean": {"average_log_prob": True}}


@pytest.fixture(scope="module")
def adapted_twins(tiny_model_dir):
    return twin_models(tiny_model_dir, b_scale=1.0)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_same_weights_same_pairs_same_loss_and_metrics(adapted_twins, name):
    # MLX with shared prompts against torch with the 2B rows: the two layouts, on two backends.
    m, t = adapted_twins
    dc = DPOConfig(beta=0.5, **SETTINGS[name])
    pb = collate_pairs(random_pairs(6, seed=2), range(6), pad_id=0, pad_to_multiple=16)

    arrays = arrays_of(pb)
    micro_step, _ = mlx_steps.make_step(m, optim.SGD(learning_rate=0.0), partial(mlx_steps.pair_loss, split_head=True, dc=dc), None)
    mlx_grads, mlx_sums = micro_step(arrays, mlx_steps.make_reference_step(m, True)(arrays))
    mlx_metrics, mlx_grads = summarize(np.array(mlx_sums)), dict(tree_flatten(mlx_grads))

    t.zero_grad(set_to_none=True)
    tensors = tensors_of(pb, shared=False)
    t.train()
    reference = torch_steps.reference_logps(t, tensors, split_head=True)
    sums = torch_micro_step(t, tensors, reference, dc)
    torch_metrics = summarize(sums.numpy())

    differences = {k: abs(torch_metrics[k] - mlx_metrics[k]) for k in mlx_metrics}
    print(f"{name}: loss {mlx_metrics['loss']:.6f}, max |torch - mlx| {max(differences.values()):.2e} "
          f"({max(differences, key=differences.get)})")
    assert max(differences.values()) < 1e-4, differences
    with torch.no_grad():  # the adapter moves the policy off the reference: the rewards are not all 0
        moved = (torch_steps.sequence_logps(t, tensors, True)[0] - reference).abs().max().item()
    print(f"largest |policy - reference| log-prob: {moved:.3f}")
    assert moved > 0.1
    grads = torch_grads(t)
    assert set(grads) == set(mlx_grads)
    scale = max(np.abs(np.array(g)).max() for g in mlx_grads.values())
    worst = max(np.abs(grads[k] - np.array(mlx_grads[k])).max() for k in grads)
    print(f"gradients: max |torch - mlx| {worst:.2e} of max |g| {scale:.2e}")
    assert worst < 3e-5 * scale  # measured: up to 2.2e-6 of the scale


def test_optimizer_steps_agree_with_mlx(tiny_model_dir):
    # Two micro-batches of different sizes per step (pair-weighted accumulation), weight decay,
    # clipping and a warmup: every piece of the update, from the same new adapter (B = 0).
    micro = [collate_pairs(p, range(len(p)), pad_id=0, pad_to_multiple=16)
             for p in (random_pairs(3, seed=4), random_pairs(5, seed=5))]
    rates = [learning_rate(s, peak=2e-2, total_steps=5, warmup_steps=2) for s in range(5)]
    dc, weight_decay, max_norm = DPOConfig(beta=0.5), 0.1, 0.1
    m, t = twin_models(tiny_model_dir, seed=3)

    optimizer = optim.AdamW(learning_rate=rates[0], weight_decay=weight_decay, bias_correction=True)  # the trainers' default
    micro_step, update = mlx_steps.make_step(m, optimizer, partial(mlx_steps.pair_loss, split_head=True, dc=dc), max_norm)
    reference_step = mlx_steps.make_reference_step(m, True)

    def inputs_of(pb):
        arrays = arrays_of(pb)
        return arrays, reference_step(arrays)

    m.train()
    step = mlx_steps.train_step(m, optimizer, micro_step, update, inputs_of, seed=0)
    results = [step(index, micro, rate) for index, rate in enumerate(rates)]
    mlx_losses = [(r.sums[1] / r.sums[0], r.grad_norm) for r in results]

    t_optimizer = MLXAdamW([p for p in t.parameters() if p.requires_grad], lr=rates[0], weight_decay=weight_decay,
                           bias_correction=True)

    def loss_of(pb):
        tensors = tensors_of(pb)
        return torch_steps.pair_loss(t, tensors, torch_steps.reference_logps(t, tensors, split_head=True), split_head=True, dc=dc)

    t.train()
    step = torch_steps.train_step(t_optimizer, loss_of, seed=0, max_grad_norm=max_norm)
    results = [step(index, micro, rate) for index, rate in enumerate(rates)]
    torch_losses = [(r.sums[1] / r.sums[0], r.grad_norm) for r in results]

    mlx_run, torch_run = np.array(mlx_losses), np.array(torch_losses)
    print(f"losses MLX {np.round(mlx_run[:, 0], 5).tolist()}, max |torch - mlx| loss "
          f"{np.abs(torch_run[:, 0] - mlx_run[:, 0]).max():.2e}, grad norm {np.abs(torch_run[:, 1] - mlx_run[:, 1]).max():.2e}")
    assert mlx_run[0, 0] == pytest.approx(math.log(2), abs=1e-6)
    assert np.abs(torch_run[:, 0] - mlx_run[:, 0]).max() < 1e-5  # measured: 8.9e-7
    assert np.abs(torch_run[:, 1] - mlx_run[:, 1]).max() < 3e-5 * mlx_run[:, 1].max()  # measured: 3.4e-6 of it
    assert mlx_run[-1, 0] < mlx_run[0, 0] - 0.05  # it trained: the agreement is not of two idle runs
    assert (mlx_run[:, 1] > max_norm).any()  # and clipping was in play
    mlx_end, torch_end = mlx_lora.adapter_weights(m), torch_lora.adapter_weights(t)
    assert max(np.abs(torch_end[k][i] - mlx_end[k][i]).max() for k in mlx_end for i in (0, 1)) < 1e-4


# --- runs ------------------------------------------------------------------------------------------

def tiny_config(model_dir, out, *extra):
    return load_config("dpo", [
        f"model.name={model_dir}", "data.k_shot=24", "data.max_valid_rows=8", "train.batch_size=4",
        "train.steps=6", "train.report_every=1", "train.warmup_steps=2", "train.learning_rate=1e-2",
        "train.checkpoint_every=3", "eval.every=0", "eval.generate_examples=0", "lora.dropout=0.0", f"out={out}", *extra])


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_cli_torch_run_matches_the_mlx_run_folder(tiny_model_dir, tmp_path):
    common = ["dpo", "--recipe", "dpo", "--model", tiny_model_dir, "--set", "train.steps=4", "--set", "train.batch_size=4",
              "--set", "data.k_shot=16", "--set", "data.max_valid_rows=8", "--set", "eval.every=2",
              "--set", "eval.generate_examples=2", "--set", "eval.max_new_tokens=4", "--set", "train.checkpoint_every=2"]
    for backend in ("mlx", "torch"):
        result = run(*common, "--backend", backend, "--out", tmp_path / backend)
        assert result.exit_code == 0, result.output
        assert "validation rewards/accuracies: 0.5000 ->" in result.output and "comparison.md" in result.output
    summaries = {b: json.loads((tmp_path / b / "summary.json").read_text()) for b in ("mlx", "torch")}
    assert list(summaries["torch"]) == list(summaries["mlx"])
    assert summaries["torch"]["backend"] == "torch" and summaries["torch"]["device"] == "cpu"
    assert summaries["torch"]["reference"] == summaries["mlx"]["reference"] == "base model (adapter off)"
    for section in ("before", "after"):
        assert list(summaries["torch"][section]) == list(summaries["mlx"][section])
    for key, value in summaries["mlx"]["before"].items():  # the same model, data and reference: the same numbers
        assert summaries["torch"]["before"][key] == pytest.approx(value, abs=1e-4), key
    records = {b: [json.loads(line) for line in (tmp_path / b / "metrics.jsonl").read_text().splitlines()] for b in summaries}
    assert [list(r) for r in records["torch"]] == [list(r) for r in records["mlx"]]
    for name in ("comparison.json", "comparison.md", "last/adapter_model.safetensors", "best/adapter_config.json",
                 "checkpoint/state.json"):
        assert (tmp_path / "torch" / name).exists(), name
    comparison = json.loads((tmp_path / "torch/comparison.json").read_text())
    assert len(comparison["items"]) == 2 and comparison["before"] == "base model, adapter off"
    assert comparison["items"][0]["prompt"] == json.loads((tmp_path / "mlx/comparison.json").read_text())["items"][0]["prompt"]

    # --resume keeps to the backend that wrote the checkpoint.
    for written_by, other in (("torch", "mlx"), ("mlx", "torch")):
        refused = run("dpo", "--resume", tmp_path / written_by, "--backend", other)
        assert refused.exit_code == 2
        assert refused.output.strip().endswith(f"written by the {written_by} backend; resume it with --backend {written_by}"), refused.output


@pytest.mark.parametrize("extra", [["lora.dropout=0.1"], ["dpo.precompute_reference=true", "train.grad_accumulation=2"]],
                         ids=["adapter-off-reference-with-dropout", "cached-reference-accumulated"])
def test_resume_after_a_kill_reproduces_the_losses(tiny_model_dir, tmp_path, stop_after_step, extra):
    config = tiny_config(tiny_model_dir, tmp_path / "a", *extra)
    dpo.train(config, backend="torch", run=Run.create(tmp_path / "a", config), echo=lambda *a: None)
    uninterrupted = losses(tmp_path / "a")
    assert uninterrupted[0] == pytest.approx(math.log(2), abs=1e-5) and uninterrupted[-1] < uninterrupted[0]
    assert len(set(uninterrupted)) == 6

    killed = tiny_config(tiny_model_dir, tmp_path / "b", *extra)
    steps = stop_after_step(5)  # killed after step 5, with a checkpoint at step 3
    with pytest.raises(KeyboardInterrupt):
        dpo.train(killed, backend="torch", run=Run.create(tmp_path / "b", killed), echo=lambda *a: None)
    assert json.loads((tmp_path / "b/checkpoint/state.json").read_text())["step"] == 3
    assert (tmp_path / "b" / REFERENCE_FILE).exists() == ("dpo.precompute_reference=true" in extra)

    dpo.train(killed, backend="torch", run=Run.open_for_resume(tmp_path / "b"), resume=True, echo=lambda *a: None)
    assert steps["after_stop"] == 3  # steps 4 to 6, and only those
    assert losses(tmp_path / "b") == pytest.approx(uninterrupted, rel=1e-6)


def test_a_reference_adapter_is_scored_once_and_agrees_with_mlx(tiny_model_dir, tmp_path):
    # The reference is base + another adapter (other modules than the new one trains), cached:
    # both backends score it the same, and the policy starts from the base model, not from it.
    rng = np.random.default_rng(0)
    weights = {f"model.layers.{i}.self_attn.{m}": (rng.normal(size=(4, 32)) * 0.2, rng.normal(size=(32, 4)) * 0.2)
               for i in range(2) for m in ("q_proj", "k_proj")}
    save_adapter(tmp_path / "sft", AdapterSpec(4, 8, 0.0, ["q_proj", "k_proj"], str(tiny_model_dir)), weights)
    summaries = {}
    for backend in ("mlx", "torch"):
        config = tiny_config(tiny_model_dir, tmp_path / backend, "train.steps=1", f"dpo.reference_adapter={tmp_path / 'sft'}")
        summaries[backend] = dpo.train(config, Run.create(tmp_path / backend, config), backend=backend, echo=lambda *a: None)
    torch_summary = summaries["torch"]
    assert torch_summary["reference"] == f"base model + adapter {tmp_path / 'sft'}"
    assert (tmp_path / "torch" / REFERENCE_FILE).exists()
    assert abs(torch_summary["before"]["eval_rewards/margins"]) > 1e-3  # policy (base) != reference (base + adapter)
    for key, value in summaries["mlx"]["before"].items():
        assert torch_summary["before"][key] == pytest.approx(value, abs=1e-4), key
    assert json.loads((tmp_path / "torch/last/adapter_config.json").read_text())["target_modules"] == ["q_proj", "v_proj"]

