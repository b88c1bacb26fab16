"""SFT packing (mlxft.data.packing): how rows are filled, the mask and positions that keep
examples apart, and on both backends the loss and gradients of packed rows against the same
examples unpacked, with the plain causal mask as the negative control."""

import json

import mlx.core as mx
import mlx.nn as nn
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
from mlxft.cli import cli
from mlxft.config import load_config
from mlxft.data.batching import collate, widen
from mlxft.data.encode import Example
from mlxft.data.packing import block_mask, pack, padding_fraction_of, segment_positions
from mlxft.errors import UserError
from mlxft.methods.sft import packed_train_set
from mlxft.models.adapters import AdapterSpec

CPU = torch.device("cpu")
SPEC = AdapterSpec(4, 8, 0.0, ["q_proj", "v_proj"], "x")


def example(n, scored_from, start=100):
    return Example(list(range(start, start + n)), [0] * scored_from + [1] * (n - scored_from))


def test_best_fit_decreasing_puts_each_example_in_the_fullest_row_it_fits():
    examples = [example(n, 0, start=10 * i) for i, n in enumerate([3, 5, 1, 4, 3, 2])]
    rows = pack(examples, width=8)
    # 5 opens a row (3 left), 4 another (4 left), 3 fills the first, 3 goes where 4 are left,
    # 2 fits nowhere (1 left) and opens a third, 1 fills the second.
    assert [row.lengths for row in rows] == [(5, 3), (4, 3, 1), (2,)]
    assert rows[0].input_ids == examples[1].input_ids + examples[0].input_ids
    assert sorted(t for row in rows for t in row.input_ids) == sorted(t for e in examples for t in e.input_ids)
    assert pack([example(9, 0)], width=8)[0].lengths == (9,)  # too long for any row: a row of its own


def test_the_first_token_of_every_example_is_not_scored():
    # Even with the prompt scored (train_on_inputs): the output before it is the previous example's.
    rows = pack([example(3, 0), example(4, 1, start=200)], width=8)
    assert rows[0].loss_mask == [0, 1, 1, 1] + [0, 1, 1]  # the longer first
    assert len(rows[0]) == 7


def test_mask_and_positions_keep_examples_apart():
    segments = np.array([[1, 1, 2, 2, 2, 0]])
    mask = block_mask(segments)[0, 0].astype(int)
    assert mask.tolist() == [[1, 0, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0],
                             [0, 0, 1, 0, 0, 0],
                             [0, 0, 1, 1, 0, 0],
                             [0, 0, 1, 1, 1, 0],
                             [0, 0, 0, 0, 0, 1]]
    assert segment_positions(segments).tolist() == [[0, 1, 0, 1, 2, 0]]


def test_collate_numbers_the_examples_and_widen_pads_them_as_padding():
    batch = collate(pack([example(3, 1), example(2, 1, start=50), example(4, 1, start=70)], width=6), pad_id=0)
    assert batch.segment_ids.tolist() == [[1, 1, 1, 1, 2, 2], [1, 1, 1, 0, 0, 0]]  # 4 + 2, then 3
    assert batch.lengths.tolist() == [6, 3]
    assert widen(batch, 0, 4).segment_ids.tolist() == [[1, 1, 1, 1, 2, 2, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0]]
    assert collate([example(3, 1)], pad_id=0).segment_ids is None


def test_padding_fraction_counts_what_batches_pad():
    # One batch of 2 rows: 5 and 3 tokens padded to 8 (multiple 4) each -> 8 of 16 real.
    assert padding_fraction_of([5, 3], batch_size=2, seed=0, pad_to_multiple=4) == pytest.approx(0.5)


def random_examples(seed=0, n=7, vocab=500):
    rng = np.random.default_rng(seed)
    examples = []
    for _ in range(n):
        length, prompt = int(rng.integers(4, 20)), int(rng.integers(1, 4))
        examples.append(Example(rng.integers(3, vocab, length).tolist(), [0] * prompt + [1] * (length - prompt)))
    return examples


def mlx_adapted(model_dir):
    model, _, _ = mlx_model.load(str(model_dir))
    mx.random.seed(0)
    mlx_lora.apply_lora(model, SPEC)
    for layer in mlx_lora.lora_layers(model).values():
        layer.lora_b = mx.random.normal(layer.lora_b.shape) * 0.5  # an adapter that changes the outputs
    return model


def mlx_loss_and_grads(model, loss, inputs):
    (_, sums), grads = nn.value_and_grad(model, loss)(model, *inputs)
    return np.array(sums), {k: np.array(v) for k, v in tree_flatten(grads)}


def test_mlx_packed_rows_give_the_loss_and_gradients_of_the_examples(tiny_model_dir):
    examples = random_examples()
    packed = collate(pack(examples, width=40), pad_id=0)
    assert len(packed.lengths) < len(examples)  # several examples share a row
    model = mlx_adapted(tiny_model_dir)
    assert mlx_model.can_pack(model, tiny_model_dir)
    rows = mlx_loss_and_grads(model, lambda *a: mlx_steps.sft_loss(*a, split_head=True),
                              mlx_steps.sft_inputs(collate(examples, pad_id=0)))
    packs = mlx_loss_and_grads(model, mlx_steps.packed_sft_loss, mlx_steps.packed_sft_inputs(packed))
    assert rows[0][0] == packs[0][0] == sum(sum(e.loss_mask[1:]) for e in examples)
    np.testing.assert_allclose(packs[0][1], rows[0][1], rtol=1e-6)  # measured: equal
    for key, grad in rows[1].items():
        scale = np.abs(grad).max()
        assert scale > 0, key
        np.testing.assert_allclose(packs[1][key], grad, atol=1e-5 * scale, err_msg=key)
    # Negative control: the same packed rows under the plain causal mask see each other.
    causal = mlx_steps.packed_sft_inputs(packed)
    causal = (causal[0], mx.array(np.tril(np.ones(causal[1].shape[-2:], dtype=bool))[None, None]), *causal[2:])
    leaked = mlx_loss_and_grads(model, mlx_steps.packed_sft_loss, causal)
    assert abs(leaked[0][1] - rows[0][1]) > 5e-5 * rows[0][1]  # measured 1.3e-4 (torch) to 2.8e-4 (mlx)


def torch_adapted(model_dir, mlx_model_with_adapter, attention):
    model, _, _ = torch_model.load(str(model_dir), device=CPU)
    torch_lora.apply_lora(model, SPEC)
    torch_lora.set_adapter_weights(model, mlx_lora.adapter_weights(mlx_model_with_adapter))
    model.set_attn_implementation(attention)
    return model


def torch_loss_and_grads(model, loss_of, batch):
    model.zero_grad(set_to_none=True)
    loss, sums = loss_of(model, batch)
    loss.backward()
    return sums.numpy(), {n: p.grad.numpy().copy() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_torch_packed_rows_give_the_loss_and_gradients_of_the_examples(tiny_model_dir, attention):
    examples = random_examples(seed=1)
    packed = collate(pack(examples, width=40), pad_id=0)
    mlx_twin = mlx_adapted(tiny_model_dir)
    model = torch_adapted(tiny_model_dir, mlx_twin, attention)
    assert torch_model.can_pack(model, tiny_model_dir)
    model.train()
    rows = torch_loss_and_grads(model, lambda m, b: torch_steps.sft_loss(m, b, split_head=True, device=CPU),
                                collate(examples, pad_id=0))
    packs = torch_loss_and_grads(model, lambda m, b: torch_steps.packed_sft_loss(m, b, device=CPU), packed)
    assert rows[0][0] == packs[0][0]
    np.testing.assert_allclose(packs[0][1], rows[0][1], rtol=1e-6)  # measured: equal
    for key, grad in rows[1].items():
        np.testing.assert_allclose(packs[1][key], grad, atol=1e-5 * np.abs(grad).max(), err_msg=key)
    # The MLX twin scores the packed rows alike (its positions run on through the row).
    mlx_sums = np.array(mlx_steps.packed_sft_loss(mlx_twin, *mlx_steps.packed_sft_inputs(packed))[1])
    np.testing.assert_allclose(mlx_sums, packs[0], rtol=1e-5)
    # Negative control: one segment per row, the plain causal mask.
    packed.segment_ids = (packed.segment_ids > 0).astype(np.int32)
    leaked = torch_loss_and_grads(model, lambda m, b: torch_steps.packed_sft_loss(m, b, device=CPU), packed)
    assert abs(leaked[0][1] - rows[0][1]) > 5e-5 * rows[0][1]  # measured 1.3e-4 (torch) to 2.8e-4 (mlx)


def test_a_model_without_the_mask_is_refused_in_one_line(tiny_model_dir):
    config = load_config("tallrec", ["data.packing=true"])
    with pytest.raises(UserError, match="data.packing needs a model whose attention takes"):
        packed_train_set(random_examples(), config, False, tiny_model_dir, 16, print)
    examples = random_examples()
    assert packed_train_set(examples, load_config("tallrec", []), False, tiny_model_dir, 16, print) is examples


@pytest.mark.parametrize("backend, width", [("mlx", "data.cutoff=256"), ("torch", "data.packing_length=256")])
def test_cli_packs_and_trains(tiny_model_dir, tmp_path, backend, width):
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["lora", "--recipe", "tallrec", "--model", str(tiny_model_dir), "--backend", backend,
                                      "--out", str(out), "--set", "data.packing=true", "--set", "data.k_shot=64",
                                      "--set", width, "--set", "train.steps=2", "--set", "train.batch_size=2",
                                      "--set", "data.max_valid_rows=4", "--set", "eval.generate_examples=0"])
    assert result.exit_code == 0, result.output
    assert "packing: 64 examples into" in result.output and "rows of up to 256 tokens" in result.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_rows"] == 64 and 10 < summary["packed_rows"] < 64
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert losses and all(np.isfinite(losses))


def test_packing_is_refused_outside_sft(tiny_model_dir, tmp_path):
    result = CliRunner().invoke(cli, ["dpo", "--recipe", "dpo", "--model", str(tiny_model_dir), "--out", str(tmp_path / "d"),
                                      "--set", "data.packing=true"])
    assert result.exit_code != 0 and "data.packing applies to SFT" in result.output
