"""The PyTorch engine against the MLX one on a 2-layer, 32-wide Llama: same losses on the same
weights, the same optimizer steps, adapters that cross between MLX, mlxft's torch backend and
plain PEFT, the CLI end to end, resume, and the install hint when torch is missing."""

import json
import sys
import warnings
from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mlxft.backends.mlx import lora as mlx_lora
from mlxft.backends.mlx import model as mlx_model
from mlxft.backends.mlx import steps as mlx_steps
from mlxft.backends.torch import lora as torch_lora
from mlxft.backends.torch import model as torch_model
from mlxft.backends.torch import steps as torch_steps
from mlxft.backends.torch.adamw import MLXAdamW
from mlxft.cli import cli
from mlxft.config import load_config
from mlxft.data.batching import collate, scored_targets
from mlxft.data.encode import Example
from mlxft.methods import sft
from mlxft.models.adapters import AdapterSpec, apply_adapter, load_adapter
from mlxft.train.runs import Run
from mlxft.train.schedule import learning_rate

CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """On these tiny models torch's threads cost more in synchronisation than they save (a 32x32
    product: 0.02 ms on one thread, 12 ms on two when another process shares the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(model_dir, out, *extra):
    return load_config("tallrec", [
        f"model.name={model_dir}", "data.max_history=3", "data.k_shot=24", "data.max_valid_rows=8",
        "train.batch_size=4", "train.steps=6", "train.report_every=1", "train.warmup_steps=2",
        "train.learning_rate=1e-2", "train.checkpoint_every=3", "eval.every=0", "eval.patience=null",
        f"out={out}", *extra])


def losses(run_dir):
    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())]


def random_batches(seed, sizes):
    """Batches of random rows with 1-5 scored tokens each, so micro-batches weigh differently."""
    rng = np.random.default_rng(seed)
    batches = []
    for size in sizes:
        rows = []
        for _ in range(size):
            length, scored = int(rng.integers(8, 40)), int(rng.integers(1, 6))
            rows.append(Example(rng.integers(3, 2000, size=length).tolist(), [0] * (length - scored) + [1] * scored))
        batches.append(collate(rows, 0, pad_to_multiple=16))
    return batches


def mlx_logits(model, ids):
    model.eval()
    return np.array(model(mx.array(ids)).astype(mx.float32))


@torch.no_grad()
def torch_logits(model, ids):
    model.eval()
    return model(input_ids=torch.from_numpy(ids).long()).logits.float().numpy()


def test_same_weights_same_batch_same_loss(tiny_model_dir):
    (batch,) = random_batches(0, [6])
    targets = scored_targets(batch)
    m, _, folder = mlx_model.load(str(tiny_model_dir))
    loss, n = mlx_model.token_losses(m, mx.array(batch.input_ids[:, :-1]), mx.array(targets.positions),
                                     mx.array(targets.tokens), mx.array(targets.weights), True)
    t, _, _ = torch_model.load(str(tiny_model_dir), device=CPU)
    assert torch_model.can_split_head(t, folder)
    args = torch_model.to_device(CPU, batch.input_ids[:, :-1], targets.positions, targets.tokens, targets.weights)
    with torch.no_grad():
        for split_head in (True, False):  # the head on scored positions only == full logits, gathered
            t_loss, t_n = torch_model.token_losses(t, *args, split_head=split_head)
            assert t_n.item() == n.item() == batch.loss_mask[:, 1:].sum()
            assert t_loss.item() / t_n.item() == pytest.approx(loss.item() / n.item(), abs=1e-4)


def _mlx_steps(model_dir, batches, rates, weight_decay, max_norm, bias_correction):
    model, _, _ = mlx_model.load(str(model_dir))
    mx.random.seed(3)
    mlx_lora.apply_lora(model, AdapterSpec(4, 8, 0.0, ["q_proj", "v_proj"], "x"))
    start = mlx_lora.adapter_weights(model)
    optimizer = optim.AdamW(learning_rate=rates[0], weight_decay=weight_decay, bias_correction=bias_correction)
    micro_step, update = mlx_steps.make_step(model, optimizer, partial(mlx_steps.sft_loss, split_head=True), max_norm)
    step = mlx_steps.train_step(model, optimizer, micro_step, update, mlx_steps.sft_inputs, seed=3)
    model.train()
    step_losses = []
    for index, (rate, step_batches) in enumerate(zip(rates, batches)):
        result = step(index, step_batches, rate)
        step_losses.append((result.sums[1] / result.sums[0], result.grad_norm))
    return start, np.array(step_losses), mlx_lora.adapter_weights(model)


def _torch_steps(model_dir, start, batches, rates, weight_decay, max_norm, bias_correction):
    model, _, _ = torch_model.load(str(model_dir), device=CPU)
    torch_lora.apply_lora(model, AdapterSpec(4, 8, 0.0, ["q_proj", "v_proj"], "x"))
    torch_lora.set_adapter_weights(model, start)
    optimizer = MLXAdamW([p for p in model.parameters() if p.requires_grad], lr=rates[0],
                         weight_decay=weight_decay, bias_correction=bias_correction)
    step = torch_steps.train_step(optimizer, partial(torch_steps.sft_loss, model, split_head=True, device=CPU), seed=3,
                                  max_grad_norm=max_norm)
    model.train()
    step_losses = []
    for index, (rate, step_batches) in enumerate(zip(rates, batches)):
        result = step(index, step_batches, rate)
        step_losses.append((result.sums[1] / result.sums[0], result.grad_norm))
    return np.array(step_losses), torch_lora.adapter_weights(model)


CLIP = 0.07


@pytest.mark.parametrize("bias_correction", [True, False])  # train.bias_correction: torch's default, MLX's
def test_five_optimizer_steps_agree_with_mlx(tiny_model_dir, bias_correction):
    # Two micro-batches per step with different scored-token counts, weight decay, clipping that
    # bites (gradient norms 0.05-0.15 against a limit of 0.07) and a warmup: every piece of the update.
    batches = [random_batches(1, [3, 5])] * 5  # the same rows each step, so the loss must fall
    rates = [learning_rate(s, peak=2e-2, total_steps=5, warmup_steps=2) for s in range(5)]
    start, mlx_steps, mlx_end = _mlx_steps(tiny_model_dir, batches, rates, 0.1, CLIP, bias_correction)
    torch_steps, torch_end = _torch_steps(tiny_model_dir, start, batches, rates, 0.1, CLIP, bias_correction)
    assert np.abs(torch_steps[:, 0] - mlx_steps[:, 0]).max() < 1.5e-5  # measured: 1.2e-6
    assert np.abs(torch_steps[:, 1] - mlx_steps[:, 1]).max() < 1e-4  # gradient norms before clipping
    assert max(np.abs(torch_end[k][i] - mlx_end[k][i]).max() for k in mlx_end for i in (0, 1)) < 7e-5  # measured: up to 7.1e-6
    assert mlx_steps[-1, 0] < mlx_steps[0, 0] - 0.03  # it trained: the agreement is not of two idle runs
    assert (mlx_steps[:, 1] > CLIP).any()  # and clipping was in play
    # the other setting would not agree: the check above can fail.
    other, _ = _torch_steps(tiny_model_dir, start, batches, rates, 0.1, CLIP, not bias_correction)
    assert np.abs(other[:, 0] - mlx_steps[:, 0]).max() > 1e-2


def _peft(model_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, str(adapter_dir))
    assert not [w for w in caught if "keys" in str(w.message)], [str(w.message) for w in caught]
    check = model.load_adapter(str(adapter_dir), adapter_name="check")  # the same file, with the key report
    assert check.missing_keys == [] and check.unexpected_keys == []
    model.set_adapter("default")
    return model


def test_adapters_cross_between_mlx_peft_and_torch(tiny_model_dir, tmp_path):
    ids = random_batches(2, [4])[0].input_ids
    # MLX-trained adapter -> plain PEFT
    config = tiny_config(tiny_model_dir, tmp_path / "mlx", "train.steps=3", "lora.dropout=0.0")
    sft.train(config, backend="mlx", run=Run.create(tmp_path / "mlx", config), echo=lambda *a: None)
    spec, weights = load_adapter(tmp_path / "mlx/last")
    assert all(np.abs(b).sum() > 0 for _, b in weights.values())
    m, _, _ = mlx_model.load(str(tiny_model_dir))
    base = mlx_logits(m, ids)
    apply_adapter(mlx_lora, m, spec, weights, "mlx")
    expected = mlx_logits(m, ids)
    assert np.abs(expected - base).max() > 1e-3  # the adapter matters
    assert np.abs(torch_logits(_peft(tiny_model_dir, tmp_path / "mlx/last"), ids) - expected).max() < 1e-4

    # torch-trained adapter -> MLX (and PEFT)
    config = tiny_config(tiny_model_dir, tmp_path / "torch", "train.steps=3")
    sft.train(config, backend="torch", run=Run.create(tmp_path / "torch", config), echo=lambda *a: None)
    spec, weights = load_adapter(tmp_path / "torch/last")
    t, _, _ = torch_model.load(str(tiny_model_dir), device=CPU)
    apply_adapter(torch_lora, t, spec, weights, "torch")
    expected = torch_logits(t, ids)
    m, _, _ = mlx_model.load(str(tiny_model_dir))
    assert np.abs(mlx_logits(m, ids) - expected).max() > 1e-3
    apply_adapter(mlx_lora, m, spec, weights, "torch")
    assert np.abs(mlx_logits(m, ids) - expected).max() < 1e-4
    assert np.abs(torch_logits(_peft(tiny_model_dir, tmp_path / "torch/last"), ids) - expected).max() < 1e-4


@pytest.mark.parametrize("layers, rslora, dora", [(None, False, False), ([1], False, False), (None, True, False),
                                                   (None, False, True)],
                         ids=["all-layers", "layers_to_transform", "rslora", "dora"])
def test_a_peft_written_adapter_loads_on_both_backends(tiny_model_dir, tmp_path, layers, rslora, dora):
    # What a PEFT user brings: get_peft_model(...).save_pretrained(), with PEFT's own config fields
    # and key names, and B non-zero so the adapter changes the outputs. rsLoRA scales by
    # alpha / sqrt(r): 8 here, against 4. DoRA's magnitudes are moved off their starting row norms,
    # so that m / ||W + scaling * B @ A|| is not 1.
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from mlxft.models.adapters import attach_adapter

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                                 layers_to_transform=layers, lora_dropout=0.0, use_rslora=rslora,
                                                 use_dora=dora))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.2)
            if "lora_magnitude_vector" in name:
                parameter.mul_(torch.empty_like(parameter).uniform_(0.5, 1.5))
    peft_model.save_pretrained(str(tmp_path / "peft"))
    ids = random_batches(4, [4])[0].input_ids
    expected = torch_logits(peft_model, ids)

    m, _, _ = mlx_model.load(str(tiny_model_dir))
    assert np.abs(mlx_logits(m, ids) - expected).max() > 1e-2  # the adapter matters
    spec = attach_adapter(mlx_lora, m, tmp_path / "peft")
    assert len(mlx_lora.lora_layers(m)) == (3 if layers else 6) and spec.scaling == (8.0 if rslora else 4.0)
    assert spec.use_dora == dora and all(map(mlx_lora.is_dora, mlx_lora.lora_layers(m).values())) == dora
    assert np.abs(mlx_logits(m, ids) - expected).max() < 4e-6  # measured: up to 3.7e-7
    t, _, _ = torch_model.load(str(tiny_model_dir), device=CPU)
    attach_adapter(torch_lora, t, tmp_path / "peft")
    assert np.abs(torch_logits(t, ids) - expected).max() < 1e-6  # measured: 0 (PEFT's own layers)


def test_an_mlx_dora_adapter_loads_in_peft_with_the_same_logits(tiny_model_dir, tmp_path):
    # lora.use_dora trains a magnitude m per output row beside A and B; PEFT's DoRA on the saved
    # file must give MLX's logits, on the torch backend too, and adapter off is the base exactly.
    from mlxft.errors import UserError
    from mlxft.train.saved_check import relative_difference

    ids = random_batches(2, [4])[0].input_ids
    config = tiny_config(tiny_model_dir, tmp_path / "mlx", "train.steps=3", "lora.dropout=0.0", "lora.use_dora=true")
    sft.train(config, backend="mlx", run=Run.create(tmp_path / "mlx", config), echo=lambda *a: None)
    spec, weights = load_adapter(tmp_path / "mlx/last")
    assert spec.use_dora and all(len(tensors) == 3 for tensors in weights.values())
    m, _, _ = mlx_model.load(str(tiny_model_dir))
    base = mlx_logits(m, ids)
    apply_adapter(mlx_lora, m, spec, weights, "mlx")
    expected = mlx_logits(m, ids)
    assert relative_difference(base, expected) > 1e-3  # the adapter matters
    layers = mlx_lora.lora_layers(m)
    start = {path: np.linalg.norm(np.array(layer.linear.weight), axis=1) for path, layer in layers.items()}
    assert max(np.abs(weights[path][2] - start[path]).max() for path in layers) > 1e-3  # m trained
    assert relative_difference(torch_logits(_peft(tiny_model_dir, tmp_path / "mlx/last"), ids), expected) < 3e-6
    with mlx_lora.adapter_off(m):
        assert np.array_equal(mlx_logits(m, ids), base)
    # The magnitudes carry the fit: plain LoRA with the same A and B would give other logits.
    plain = {path: (a, b, np.linalg.norm(np.array(layers[path].linear.weight) + spec.scaling * b @ a, axis=1))
             for path, (a, b, _) in weights.items()}
    with mlx_lora.adapter_swapped(m, plain, spec.scaling):
        assert relative_difference(mlx_logits(m, ids), expected) > 1e-2
    # Half the adapter swapped in: the other layers are their base layers on both backends.
    half = {path: tensors for path, tensors in weights.items() if ".layers.0." in path}
    with mlx_lora.adapter_swapped(m, half, spec.scaling):
        swapped = mlx_logits(m, ids)
    assert min(relative_difference(swapped, base), relative_difference(swapped, expected)) > 1e-2
    with pytest.raises(UserError, match="is a LoRA adapter and the trained one is a DoRA adapter"):
        with mlx_lora.adapter_swapped(m, {path: (a, b) for path, (a, b, _) in half.items()}, spec.scaling):
            pass

    t, _, _ = torch_model.load(str(tiny_model_dir), device=CPU)
    torch_base = torch_logits(t, ids)
    apply_adapter(torch_lora, t, spec, weights, "mlx")
    assert relative_difference(torch_logits(t, ids), expected) < 3e-6
    with torch_lora.adapter_off(t):
        assert np.array_equal(torch_logits(t, ids), torch_base)
    with torch_lora.adapter_swapped(t, half, spec.scaling):
        assert relative_difference(torch_logits(t, ids), swapped) < 3e-6
    assert all(p.requires_grad for layer in torch_lora.lora_layers(t).values() for p in torch_lora.adapter_tensors(layer))
    for path, tensors in torch_lora.adapter_weights(t).items():  # and the trained tensors are back
        assert all(np.array_equal(got, want) for got, want in zip(tensors, weights[path]))


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_cli_torch_run_matches_the_mlx_run_folder(tiny_model_dir, tmp_path):
    from mlxft.data.dataset import mind_records
    from mlxft.data.records import write_jsonl

    common = ["lora", "--recipe", "tallrec", "--model", tiny_model_dir, "--set", "train.steps=2",
              "--set", "data.k_shot=8", "--set", "data.max_valid_rows=8", "--set", "data.max_history=3",
              "--set", "train.batch_size=4", "--set", "eval.every=0"]
    for backend in ("mlx", "torch"):
        result = run(*common, "--backend", backend, "--out", tmp_path / backend)
        assert result.exit_code == 0, result.output
        assert "validation auc:" in result.output
    summaries = {b: json.loads((tmp_path / b / "summary.json").read_text()) for b in ("mlx", "torch")}
    assert list(summaries["torch"]) == list(summaries["mlx"])
    assert summaries["torch"]["backend"] == "torch" and summaries["torch"]["device"] == "cpu"
    for section in ("before", "after"):
        assert list(summaries["torch"][section]) == list(summaries["mlx"][section])
    assert summaries["torch"]["before"]["eval_loss"] == pytest.approx(summaries["mlx"]["before"]["eval_loss"], abs=1e-4)
    records = {b: [json.loads(line) for line in (tmp_path / b / "metrics.jsonl").read_text().splitlines()] for b in summaries}
    assert [list(r) for r in records["torch"]] == [list(r) for r in records["mlx"]]

    # `eval auc` scores the torch run's adapter the same on both backends.
    rows = tmp_path / "rows.jsonl"
    write_jsonl([r.fields for r in mind_records(Path("data/mind-sample"), max_history=3)[:40]], rows)
    scores = {}
    for backend in ("mlx", "torch"):
        result = run("eval", "auc", "--model", tiny_model_dir, "--adapter", tmp_path / "torch", "--data", rows,
                     "--backend", backend, "--json")
        assert result.exit_code == 0, result.output
        scores[backend] = json.loads(result.output)
    assert scores["torch"]["rows"] == 40
    assert scores["torch"]["auc"] == pytest.approx(scores["mlx"]["auc"], abs=1e-6)
    assert scores["torch"]["loss"] == pytest.approx(scores["mlx"]["loss"], abs=1e-4)


@pytest.mark.parametrize("extra, trainable", [
    (["lora.dropout=0.3", "train.weight_decay=0.01"], 2 * 2 * 8 * (32 + 32)),  # layers x (q, v) x r x (in + out)
    (["lora.full_finetune=true"], 2048 * 32 + 2 * (4 * 32 * 32 + 3 * 32 * 64 + 2 * 32) + 32),  # tied head: once
], ids=["lora-dropout", "full"])
def test_resume_after_a_kill_reproduces_the_losses(tiny_model_dir, tmp_path, stop_after_step, extra, trainable):
    config = tiny_config(tiny_model_dir, tmp_path / "a", *extra)
    summary = sft.train(config, backend="torch", run=Run.create(tmp_path / "a", config), echo=lambda *a: None)
    assert summary["trainable_parameters"] == trainable  # the same counts as the MLX trainer's
    uninterrupted = losses(tmp_path / "a")

    killed = tiny_config(tiny_model_dir, tmp_path / "b", *extra)
    steps = stop_after_step(5)  # killed after step 5, with a checkpoint at step 3
    with pytest.raises(KeyboardInterrupt):
        sft.train(killed, backend="torch", run=Run.create(tmp_path / "b", killed), echo=lambda *a: None)
    assert json.loads((tmp_path / "b/checkpoint/state.json").read_text())["step"] == 3

    sft.train(killed, backend="torch", run=Run.open_for_resume(tmp_path / "b"), resume=True, echo=lambda *a: None)
    assert steps["after_stop"] == 3  # steps 4 to 6, and only those
    assert losses(tmp_path / "b") == pytest.approx(uninterrupted, rel=1e-6)
    assert len(set(uninterrupted)) == 6  # six different steps, not one loss six times
    if "lora.full_finetune=true" in extra:  # a fully fine-tuned model folder loads on MLX as it is
        ids = random_batches(5, [3])[0].input_ids
        t, _, _ = torch_model.load(str(tmp_path / "b/last"), device=CPU)
        m, _, _ = mlx_model.load(str(tmp_path / "b/last"))
        assert np.abs(mlx_logits(m, ids) - torch_logits(t, ids)).max() < 1e-4
    # Its optimizer state is torch's: the MLX trainer is not handed it.
    refused = run("lora", "--resume", tmp_path / "b", "--backend", "mlx")
    assert refused.exit_code == 2
    assert refused.output.strip().endswith("written by the torch backend; resume it with --backend torch"), refused.output


def test_gradient_checkpointing_keeps_the_dropout_mask(tiny_model_dir):
    # torch's checkpoint restores the RNG state before recomputing a block, so unlike on MLX
    # (which refuses the combination) the recomputed dropout mask is the one the loss saw.
    (batch,) = random_batches(4, [4])
    results = []
    for checkpointed in (False, True):
        model, _, _ = torch_model.load(str(tiny_model_dir), device=CPU)
        torch.manual_seed(0)
        torch_lora.apply_lora(model, AdapterSpec(4, 8, 0.3, ["q_proj", "v_proj"], "x"))
        for layer in torch_lora.lora_layers(model).values():  # B = 0 would make A's gradient vanish
            torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
        if checkpointed:
            torch_model.enable_gradient_checkpointing(model)
        model.train()
        torch.manual_seed(1)
        loss, _ = torch_steps.sft_loss(model, batch, split_head=True, device=CPU)
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
    (plain_loss, plain), (checkpointed_loss, checkpointed) = results
    assert checkpointed_loss == pytest.approx(plain_loss, rel=1e-6)
    assert all(g.abs().sum() > 0 for g in plain)
    assert max((a - b).abs().max().item() for a, b in zip(plain, checkpointed)) < 1e-6


def test_torch_backend_without_torch_gives_the_install_hint(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    for args in (["lora", "--recipe", "tallrec", "--out", tmp_path / "run"],
                 ["eval", "auc", "--data", "data/mind-sample"]):
        result = run(*args, "--backend", "torch")
        assert result.exit_code == 2, result.output
        assert result.output.strip() == 'error: the PyTorch backend needs torch, transformers and peft: pip install "mlxft[torch]"'
    assert not (tmp_path / "run").exists()


def test_auto_backend_is_mlx_on_apple_silicon_and_torch_elsewhere(monkeypatch):
    from mlxft import backends

    monkeypatch.setattr(backends, "on_apple_silicon", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert backends.resolve_backend("auto") == "torch"
    monkeypatch.setattr(backends, "on_apple_silicon", lambda: True)
    assert backends.resolve_backend("auto") == "mlx"
    monkeypatch.setattr(backends, "on_apple_silicon", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert backends.resolve_backend("auto") == "torch"  # CPU-only: PyTorch measured faster here
    assert backends.resolve_backend("auto", quantized=True) == "mlx"  # QLoRA on torch needs CUDA
    assert backends.resolve_backend("auto", supports=("mlx",)) == "mlx"
    assert backends.resolve_backend("torch") == "torch"
    monkeypatch.setattr(backends, "torch_available", lambda: False)
    assert backends.resolve_backend("auto") == "mlx"  # without the extra: MLX
    from mlxft.errors import NotImplementedYet

    with pytest.raises(NotImplementedYet, match="use --backend mlx"):
        backends.resolve_backend("torch", supports=("mlx",))


def test_mlx_quantized_models_are_recognised_without_loading(tmp_path):
    from mlxft.backends import is_mlx_quantized

    (tmp_path / "q").mkdir()
    (tmp_path / "q/config.json").write_text('{"model_type": "llama", "quantization": {"bits": 4, "group_size": 64}}')
    (tmp_path / "f").mkdir()
    (tmp_path / "f/config.json").write_text('{"model_type": "llama"}')
    assert is_mlx_quantized(str(tmp_path / "q")) and not is_mlx_quantized(str(tmp_path / "f"))
    assert is_mlx_quantized("mlx-community/Qwen2.5-0.5B-Instruct-4bit") and not is_mlx_quantized("builtin")


def test_qlora_needs_cuda_here(tiny_model_dir, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    result = run("lora", "--recipe", "tallrec", "--model", tiny_model_dir, "--backend", "torch", "--quantize", "4",
                 "--out", tmp_path / "run")
    assert result.exit_code == 2 and "needs CUDA (bitsandbytes)" in result.output, result.output


def test_an_mlx_quantized_folder_is_refused_in_one_line(tiny_model_dir, tmp_path):
    import shutil

    from mlx_lm.utils import quantize_model, save_config, save_model

    from mlxft.errors import UserError
    from mlxft.models.builtin import write_model

    wide = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 2,
            "num_key_value_heads": 2, "max_position_embeddings": 512}  # 64: MLX's smallest quantization group
    for folder in (tmp_path / "wide", tmp_path / "q4"):
        folder.mkdir()
        for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
            shutil.copy(tiny_model_dir / name, folder / name)
    write_model(tmp_path / "wide", wide, seed=2)
    model, _, _ = mlx_model.load(str(tmp_path / "wide"))
    model, config = quantize_model(model, json.loads((tmp_path / "wide/config.json").read_text()), group_size=64, bits=4)
    save_model(tmp_path / "q4", model)
    save_config(config, tmp_path / "q4/config.json")
    with pytest.raises(UserError, match="is quantized in MLX's format; the PyTorch backend needs the full-precision model"):
        torch_model.load(str(tmp_path / "q4"), device=CPU)


@pytest.mark.cuda
@needs_cuda
def test_qlora_on_cuda_trains(tiny_model_dir, tmp_path):
    config = tiny_config(tiny_model_dir, tmp_path / "q", "model.quantize=4", "train.steps=2")
    summary = sft.train(config, backend="torch", run=Run.create(tmp_path / "q", config), echo=lambda *a: None)
    assert summary["device"].startswith("cuda") and summary["trainable_parameters"] == 2048


def test_one_dispatch_gives_each_backend_its_engine():
    from mlxft.backends import engine_for
    from mlxft.errors import UserError

    assert engine_for("mlx").name == "mlx" and engine_for("mlx").lora.__name__ == "mlxft.backends.mlx.lora"
    assert engine_for("torch").generate_answer.__module__ == "mlxft.backends.torch.generate"
    with pytest.raises(UserError, match="no backend 'auto'"):
        engine_for("auto")
