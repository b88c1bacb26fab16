"""`mlxft fuse`: fused == base + adapter, the folder loads in mlx-lm and transformers, quantized
bases, run folders, and a fuse that fails or would overwrite leaves nothing behind."""

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner

from mlxft.backends.mlx import lora
from mlxft.backends.mlx.fuse import fuse
from mlxft.backends.mlx.model import load
from mlxft.cli import cli
from mlxft.errors import UserError
from mlxft.models.adapters import AdapterSpec, save_adapter

TARGETS = ["q_proj", "v_proj", "down_proj"]  # square, narrow and wide layers
IDS = [1, 57, 300, 12, 999, 4, 1500, 77]


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def make_adapter(model_dir, folder, *, seed=0, base=None, r=4, alpha=8.0, dora=False):
    """An adapter with non-zero B (a fresh one would be a no-op and prove nothing); for DoRA, with
    magnitudes off the row norms of W + scaling * B @ A, so that they rescale the rows."""
    from mlxft.backends.mlx.fuse import dense_weight

    model, _, _ = load(str(model_dir))
    rng = np.random.default_rng(seed)
    modules = dict(model.named_modules())
    weights = {path: (rng.normal(0, 0.2, (r, i)).astype(np.float32), rng.normal(0, 0.2, (o, r)).astype(np.float32))
               for path, (o, i) in lora.linear_modules(model).items() if path.rsplit(".", 1)[-1] in TARGETS}
    if dora:
        weights = {path: (a, b, np.linalg.norm(np.array(dense_weight(modules[path])) + alpha / r * b @ a, axis=1)
                          * rng.uniform(0.5, 1.5, b.shape[0]).astype(np.float32)) for path, (a, b) in weights.items()}
    save_adapter(folder, AdapterSpec(r, alpha, 0.0, TARGETS, str(base or model_dir), use_dora=dora), weights)
    return folder


def logits(model, ids=IDS):
    return np.array(model(mx.array([ids])).astype(mx.float32))[0]


def base_plus_adapter(model_dir, adapter):
    from mlxft.models.adapters import apply_adapter, load_adapter

    model, _, _ = load(str(model_dir))
    spec, weights = load_adapter(adapter)
    apply_adapter(lora, model, spec, weights, str(adapter))
    model.eval()
    return model


@pytest.fixture(scope="module")
def adapter(tiny_model_dir, tmp_path_factory):
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter") / "a")


@pytest.fixture(scope="module")
def fused(tiny_model_dir, adapter, tmp_path_factory):
    return fuse(adapter, tmp_path_factory.mktemp("fused") / "out").out


def test_fused_logits_equal_base_plus_adapter(tiny_model_dir, adapter, fused):
    expected = logits(base_plus_adapter(tiny_model_dir, adapter))
    got = logits(load(str(fused))[0])
    np.testing.assert_allclose(got, expected, atol=1e-4)
    base = logits(load(str(tiny_model_dir))[0])
    assert np.abs(expected - base).max() > 1e-2  # the adapter matters: the check above can fail
    assert not any(isinstance(m, lora.LoRALinear) for _, m in load(str(fused))[0].named_modules())


def test_fused_folder_loads_in_mlx_lm_and_transformers(tiny_model_dir, fused):
    import torch
    from mlx_lm import load as mlx_lm_load
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (fused / name).exists(), name
    mlx_fused = logits(load(str(fused))[0])
    model, _ = mlx_lm_load(str(fused))
    np.testing.assert_allclose(logits(model), mlx_fused, atol=1e-5)

    hf = AutoModelForCausalLM.from_pretrained(str(fused), dtype=torch.float32)
    with torch.no_grad():
        hf_logits = hf(torch.tensor([IDS])).logits[0].numpy()
    np.testing.assert_allclose(hf_logits, mlx_fused, atol=1e-3)
    text = "Below is an instruction that describes a task."
    assert AutoTokenizer.from_pretrained(str(fused))(text).input_ids == AutoTokenizer.from_pretrained(str(tiny_model_dir))(text).input_ids


def test_a_run_folder_means_its_best_adapter_and_model_overrides_the_base(tiny_model_dir, tmp_path):
    run_dir = tmp_path / "run"
    make_adapter(tiny_model_dir, run_dir / "best", seed=3, base=tmp_path / "moved-away")
    make_adapter(tiny_model_dir, run_dir / "last", seed=4, base=tmp_path / "moved-away")
    result = run("fuse", "--adapter", run_dir, "--out", tmp_path / "x")
    assert result.exit_code == 2 and "moved-away" in result.output and "Traceback" not in result.output
    result = run("fuse", "--adapter", run_dir, "--model", tiny_model_dir, "--out", tmp_path / "fused")
    assert result.exit_code == 0, result.output
    expected = logits(base_plus_adapter(tiny_model_dir, run_dir / "best"))
    np.testing.assert_allclose(logits(load(str(tmp_path / "fused"))[0]), expected, atol=1e-4)

    shutil.rmtree(run_dir / "best")  # no best/ (no evaluation ran): last/ is the adapter
    assert run("fuse", "--adapter", run_dir, "--model", tiny_model_dir, "--out", tmp_path / "fused", "--force").exit_code == 0
    np.testing.assert_allclose(logits(load(str(tmp_path / "fused"))[0]),
                               logits(base_plus_adapter(tiny_model_dir, run_dir / "last")), atol=1e-4)


def test_a_full_finetuning_run_is_already_a_model(tiny_model_dir, tmp_path):
    shutil.copytree(tiny_model_dir, tmp_path / "run" / "best")
    result = run("fuse", "--adapter", tmp_path / "run", "--out", tmp_path / "out")
    assert result.exit_code == 0
    assert result.output.strip().count("\n") == 0 and "already a whole model" in result.output
    assert not (tmp_path / "out").exists()


def test_non_empty_out_is_refused_without_force(adapter, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = run("fuse", "--adapter", adapter, "--out", out)
    assert result.exit_code == 2 and "--force" in result.output
    assert (out / "notes.txt").read_text() == "mine"
    assert run("fuse", "--adapter", adapter, "--out", out, "--force").exit_code == 0
    assert not (out / "notes.txt").exists() and (out / "model.safetensors").exists()


def test_a_failure_mid_fuse_leaves_no_output(adapter, tmp_path, monkeypatch):
    import mlx_lm.utils

    def breaks(*args, **kwargs):  # after the weights are written, before the config
        raise RuntimeError("disk full")

    monkeypatch.setattr(mlx_lm.utils, "save_config", breaks)
    with pytest.raises(RuntimeError, match="disk full"):
        fuse(adapter, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary sibling


WIDE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 2, "max_position_embeddings": 512}


@pytest.fixture(scope="module")
def quantized_dir(tiny_model_dir, tmp_path_factory):
    """A 4-bit, 64-wide model (MLX quantizes in groups of 64), saved as mlx-community models are."""
    from mlx_lm.utils import quantize_model, save_config, save_model

    from mlxft.models.builtin import write_model

    wide = tmp_path_factory.mktemp("wide")
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, wide / name)
    write_model(wide, WIDE, seed=2)
    model, _, _ = load(str(wide))
    model, config = quantize_model(model, json.loads((wide / "config.json").read_text()), group_size=64, bits=4)
    folder = tmp_path_factory.mktemp("q4")
    save_model(folder, model)
    save_config(config, folder / "config.json")
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(wide / name, folder / name)
    return folder


def test_a_quantized_base_fuses_dequantized_by_default(quantized_dir, tmp_path):
    adapter = make_adapter(quantized_dir, tmp_path / "adapter")
    out = fuse(adapter, tmp_path / "fused").out
    config = json.loads((out / "config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config
    model = load(str(out))[0]
    assert not any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in model.named_modules())
    # Exactly base (4-bit) + adapter: no second rounding of the merged weights.
    np.testing.assert_allclose(logits(model), logits(base_plus_adapter(quantized_dir, adapter)), atol=1e-4)


def test_a_quantized_base_stays_quantized_with_quantize(quantized_dir, tmp_path):
    adapter = make_adapter(quantized_dir, tmp_path / "adapter")
    result = run("fuse", "--adapter", adapter, "--out", tmp_path / "q", "--quantize", "4")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 64
    model = load(str(tmp_path / "q"))[0]
    modules = dict(model.named_modules())
    assert isinstance(modules["model.layers.0.self_attn.q_proj"], nn.QuantizedLinear)  # merged, quantized again
    base = dict(load(str(quantized_dir))[0].named_modules())
    untouched = "model.layers.0.self_attn.k_proj"
    assert (np.array(modules[untouched].weight) == np.array(base[untouched].weight)).all()  # not re-quantized
    # The merged layer is the exact merge rounded once to the 4-bit grid: within one step of it
    # (MLX shifts the grid so that zero is exact, so the error can pass half a step).
    exact = dict(load(str(fuse(adapter, tmp_path / "exact").out))[0].named_modules())["model.layers.0.self_attn.q_proj"].weight
    q = modules["model.layers.0.self_attn.q_proj"]
    error = np.abs(np.array(mx.dequantize(q.weight, q.scales, q.biases, group_size=64, bits=4) - exact))
    step = np.repeat(np.abs(np.array(q.scales)), 64, axis=1)  # MLX scales carry a sign
    assert (error <= step * 1.001).all() and error.max() > 0


@pytest.mark.parametrize("quantized", [False, True], ids=["full-precision", "4-bit"])
def test_a_dora_adapter_fuses_to_its_rescaled_rows(tiny_model_dir, quantized_dir, tmp_path, quantized):
    # W' = m * (W + scaling * B @ A) / ||W + scaling * B @ A|| per output row; a 4-bit base is
    # de-quantized for it, as DoRA's norms are on the de-quantized weights (QLoRA + DoRA).
    model_dir = quantized_dir if quantized else tiny_model_dir
    adapter = make_adapter(model_dir, tmp_path / "dora", dora=True)
    adapted = base_plus_adapter(model_dir, adapter)
    assert all(isinstance(layer.linear, nn.QuantizedLinear) == quantized for layer in lora.lora_layers(adapted).values())
    expected = logits(adapted)
    fused = load(str(fuse(adapter, tmp_path / "fused").out))[0]
    np.testing.assert_allclose(logits(fused), expected, atol=1e-4)
    with lora.adapter_off(adapted):  # adapter off is the base, not the base rescaled by m / ||W||
        assert np.array_equal(logits(adapted), logits(load(str(model_dir))[0]))
    # the magnitudes matter: the same A and B merged as plain LoRA give other logits.
    plain = make_adapter(model_dir, tmp_path / "lora")
    assert np.abs(logits(base_plus_adapter(model_dir, plain)) - expected).max() > 1e-2


def test_fuse_checks_its_output_against_base_plus_adapter(adapter, tmp_path, monkeypatch):
    result = fuse(adapter, tmp_path / "ok")
    assert result.check["fused_vs_adapted"] < 1e-5 and result.check["probe_tokens"] == 16
    import mlxft.backends.mlx.fuse as fuse_module

    monkeypatch.setattr(fuse_module, "merge_adapter", lambda model, weights, scale: [])  # a merge that merges nothing
    with pytest.raises(UserError, match="fuse check failed: the fused model's logits differ from base \\+ adapter"):
        fuse(adapter, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


# `mlxft fuse --backend torch`: PEFT's merge, the same folder as the MLX fuse.

@pytest.fixture(scope="module")
def torch_fused(adapter, tmp_path_factory):
    out = tmp_path_factory.mktemp("torch-fused") / "out"
    result = run("fuse", "--backend", "torch", "--adapter", adapter, "--out", out)
    assert result.exit_code == 0, result.output
    assert "checked: the fused model's logits differ from base + adapter by" in result.output
    return out


def torch_logits(model, ids=IDS):
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def test_torch_fuse_writes_the_mlx_fuse_weights(tiny_model_dir, fused, torch_fused):
    from safetensors.numpy import load_file

    on_mlx, on_torch = load_file(fused / "model.safetensors"), load_file(torch_fused / "model.safetensors")
    assert set(on_torch) == set(on_mlx)
    for key, value in on_mlx.items():
        assert on_torch[key].dtype == value.dtype
        np.testing.assert_allclose(on_torch[key], value, atol=1e-6, err_msg=key)
    base = load_file(tiny_model_dir / "model.safetensors")
    assert np.abs(on_torch["model.layers.0.self_attn.q_proj.weight"] - base["model.layers.0.self_attn.q_proj.weight"]).max() > 1e-2
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert json.loads((torch_fused / name).read_text()) == json.loads((fused / name).read_text()), name
    assert (torch_fused / "chat_template.jinja").read_text() == (fused / "chat_template.jinja").read_text()


def test_torch_fused_folder_loads_in_transformers_and_mlx_lm_with_the_adapters_logits(tiny_model_dir, adapter, torch_fused):
    import torch
    from mlx_lm import load as mlx_lm_load
    from transformers import AutoModelForCausalLM

    from mlxft.backends.torch import lora as torch_lora
    from mlxft.backends.torch.model import load as torch_load
    from mlxft.models.adapters import attach_adapter

    adapted = torch_load(str(tiny_model_dir))[0]
    attach_adapter(torch_lora, adapted, adapter)
    adapted.eval()
    expected = torch_logits(adapted)
    hf = AutoModelForCausalLM.from_pretrained(str(torch_fused), dtype=torch.float32)
    np.testing.assert_allclose(torch_logits(hf), expected, atol=1e-4)
    assert not any("lora" in name for name, _ in hf.named_parameters())
    model, _ = mlx_lm_load(str(torch_fused))
    np.testing.assert_allclose(logits(model), logits(base_plus_adapter(tiny_model_dir, adapter)), atol=1e-4)
    with torch_lora.adapter_off(adapted):  # the adapter matters: the checks above can fail
        assert np.abs(torch_logits(adapted) - expected).max() > 1e-2


def test_torch_fuse_of_a_dora_adapter_equals_mlxs(tiny_model_dir, tmp_path):
    from safetensors.numpy import load_file

    from mlxft.backends.torch.fuse import fuse as torch_fuse

    adapter = make_adapter(tiny_model_dir, tmp_path / "dora", dora=True)
    on_torch = load_file(torch_fuse(adapter, tmp_path / "torch").out / "model.safetensors")
    on_mlx = load_file(fuse(adapter, tmp_path / "mlx").out / "model.safetensors")
    for key, value in on_mlx.items():
        np.testing.assert_allclose(on_torch[key], value, atol=1e-5, err_msg=key)
    plain = load_file(fuse(make_adapter(tiny_model_dir, tmp_path / "lora"), tmp_path / "plain").out / "model.safetensors")
    assert np.abs(plain["model.layers.0.self_attn.q_proj.weight"] - on_torch["model.layers.0.self_attn.q_proj.weight"]).max() > 1e-3


def test_torch_fuse_checks_its_output_and_has_no_quantize_yet(adapter, tmp_path, monkeypatch):
    import mlxft.backends.torch.fuse as torch_fuse_module
    from mlxft.backends.torch import lora as torch_lora

    result = run("fuse", "--backend", "torch", "--adapter", adapter, "--out", tmp_path / "q", "--quantize", "4")
    assert result.exit_code == 2 and "not implemented on the PyTorch backend" in result.output
    assert not (tmp_path / "q").exists()
    monkeypatch.setattr(torch_fuse_module, "merge_adapter", torch_lora.remove_lora)  # a merge that merges nothing
    with pytest.raises(UserError, match="fuse check failed: the fused model's logits differ from base \\+ adapter"):
        torch_fuse_module.fuse(adapter, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_torch_fuse_keeps_a_bf16_base_in_bf16(tiny_model_dir, tmp_path):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from mlxft.backends.torch.fuse import fuse as torch_fuse

    base = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.bfloat16).save_pretrained(base)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, base / name)
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter", base=base)
    result = torch_fuse(adapter, tmp_path / "fused")
    with safe_open(str(result.out / "model.safetensors"), "np") as handle:
        assert {handle.get_slice(key).get_dtype() for key in handle.keys()} == {"BF16"}
    assert 0 < result.check["fused_vs_adapted"] <= 3e-2  # the merged sum rounded once to bf16
