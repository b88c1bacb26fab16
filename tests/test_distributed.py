"""Data parallelism (mlxft.train.distributed): two ranks on loopback, MLX's ring (mlx.launch) and
PyTorch's gloo (torchrun), train like one process on the same global batch, and only rank 0 writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

from mlxft.cli import cli
from mlxft.data.batching import collate, collate_pairs
from mlxft.data.encode import Example, PreferenceExample
from mlxft.errors import UserError
from mlxft.train.distributed import World

VOLATILE = {"tokens_per_second", "peak_memory_gb", "peak_rss_gb", "active_memory_gb", "cache_memory_gb"}


def command(method, model_dir, out, *extra):
    recipe = "tallrec" if method == "lora" else "dpo"
    return [sys.executable, "-m", "mlxft.cli", method, "--recipe", recipe, "--model", str(model_dir), "--out", str(out),
            "--set", "train.steps=6", "--set", "train.batch_size=5", "--set", "train.report_every=1",
            "--set", "train.checkpoint_every=3", "--set", "eval.every=3", "--set", "data.k_shot=30",
            "--set", "data.max_valid_rows=9", "--set", "lora.dropout=0", "--set", "eval.generate_examples=0",
            "--set", "train.learning_rate=1e-2", *extra]


def run(args, **kwargs):
    result = subprocess.run(args, capture_output=True, text=True, timeout=600, **kwargs)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def worst_difference(one, two):
    assert [r["step"] for r in two] == [r["step"] for r in one]
    return max(abs(a[k] - b[k]) / max(1.0, abs(a[k])) for a, b in zip(one, two) for k in a if k not in VOLATILE)


def adapter_difference(one, two):
    from safetensors.numpy import load_file

    a, b = (load_file(str(folder / "last" / "adapter_model.safetensors")) for folder in (one, two))
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["mlx", "torch"])
@pytest.mark.parametrize("method", ["lora", "dpo"])
def test_two_ranks_train_like_one_process(tiny_model_dir, tmp_path, backend, method):
    if backend == "torch":
        pytest.importorskip("peft")
    run(command(method, tiny_model_dir, tmp_path / "one", "--backend", backend))
    two = run(command(method, tiny_model_dir, tmp_path / "two", "--backend", backend, "--nproc", "2"))
    worst = worst_difference(metrics(tmp_path / "one"), metrics(tmp_path / "two"))
    weights = adapter_difference(tmp_path / "one", tmp_path / "two")
    print(f"{backend} {method}: largest metric difference {worst:.1e}, adapter {weights:.1e}")
    assert worst < 5e-6 and weights < 1e-5  # measured: up to 5.1e-7 and 1.0e-6
    assert "eval_loss" in metrics(tmp_path / "two")[2]  # sharded validation, reduced, is compared too
    # Rank 0 alone wrote and printed: one report a step, one summary line
    assert two.stdout.count("run folder:") == 1 and two.stdout.count("adapter:") == 1
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


def weights_difference(one, two):
    from safetensors.numpy import load_file

    a, b = (load_file(str(folder / "last" / "model.safetensors")) for folder in (one, two))
    assert sorted(a) == sorted(b)  # a tied head saved once, as one process saves it
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


FULL = ("--backend", "torch", "--set", "lora.full_finetune=true")


@pytest.mark.slow
def test_fsdp_ranks_train_like_one_process_each_holding_half(tiny_model_dir, tmp_path):
    """train.fsdp: a full fine-tune sharded over 2 CPU ranks (gloo) gives one process's losses,
    validation and weights, while each rank holds half of the weights and of AdamW's moments."""
    pytest.importorskip("peft")
    run(command("lora", tiny_model_dir, tmp_path / "one", *FULL))
    two = run(command("lora", tiny_model_dir, tmp_path / "two", *FULL, "--nproc", "2", "--set", "train.fsdp=true"))
    worst = worst_difference(metrics(tmp_path / "one"), metrics(tmp_path / "two"))
    weights = weights_difference(tmp_path / "one", tmp_path / "two")
    shards = json.loads((tmp_path / "two" / "summary.json").read_text())["fsdp"]
    print(f"fsdp: largest metric difference {worst:.1e}, weights {weights:.1e}, rank 0 holds {shards}")
    # measured: losses equal to the last digit; grad_norm within 8.8e-6 (its squares summed shard by
    # shard), weights within 1.2e-7
    assert worst < 3e-5 and weights < 1e-5
    assert "eval_loss" in metrics(tmp_path / "two")[2] and "sharded across 2 ranks (FSDP)" in two.stdout
    assert shards["ranks"] == 2 and abs(shards["parameters_on_this_rank"] / shards["parameters"] - 0.5) < 0.02
    assert shards["optimizer_state_on_this_rank"] == 2 * shards["parameters_on_this_rank"]  # m and v, sharded alike
    # Negative control: without train.fsdp each rank holds everything, and says nothing of shards.
    assert "fsdp" not in json.loads((tmp_path / "one" / "summary.json").read_text())


@pytest.mark.slow
def test_a_killed_fsdp_run_resumes_sharded_and_in_one_process(tiny_model_dir, tmp_path):
    pytest.importorskip("peft")
    slow = ["--set", "train.steps=12", "--set", "eval.every=0"]
    run(command("lora", tiny_model_dir, tmp_path / "whole", *FULL, *slow))
    for name, ranks in (("sharded", ["--nproc", "2"]), ("alone", [])):
        out = tmp_path / name
        started = subprocess.Popen(command("lora", tiny_model_dir, out, *FULL, "--nproc", "2", "--set", "train.fsdp=true", *slow),
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        state = out / "checkpoint" / "state.json"
        deadline = time.time() + 300
        while not state.exists() and started.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        os.killpg(started.pid, signal.SIGKILL)
        kill_every_process_naming(str(out))
        started.wait()
        assert 3 <= json.loads(state.read_text())["step"] < 12
        run([sys.executable, "-m", "mlxft.cli", "lora", "--resume", str(out), *ranks])
        assert worst_difference(metrics(tmp_path / "whole"), metrics(out)) < 3e-5, name
        assert weights_difference(tmp_path / "whole", out) < 1e-5, name


def test_fsdp_mistakes_are_said_before_a_model_loads(tiny_model_dir, tmp_path):
    base = ["lora", "--recipe", "tallrec", "--model", str(tiny_model_dir), "--out", str(tmp_path / "r"), "--set", "train.fsdp=true",
            "--set", "train.steps=1"]
    full = ["--backend", "torch", "--set", "lora.full_finetune=true"]
    for extra, message in ((["--backend", "mlx", "--set", "lora.full_finetune=true"], "MLX's ranks"),
                           (["--backend", "torch", "--set", "lora.full_finetune=false"], "a LoRA adapter is small enough"),
                           ([*full, "--set", "eval.generate_examples=2"], "eval.generate_examples=0"),
                           (full, "start several: --nproc 2")):
        if "torch" in extra:
            pytest.importorskip("peft")
        result = CliRunner().invoke(cli, base + extra)
        assert result.exit_code != 0 and message in result.output, result.output
        assert not (tmp_path / "r").exists()


def kill_every_process_naming(text: str) -> None:
    """SIGKILL every process whose command line holds `text`, and wait until they are gone."""
    from pathlib import Path

    for _ in range(100):
        found = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
        if not found:
            return
        for pid in found:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.1)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_a_killed_distributed_run_resumes_with_any_number_of_ranks(tiny_model_dir, tmp_path, backend):
    if backend == "torch":
        pytest.importorskip("peft")
    slow = ["--set", "train.steps=12", "--set", "eval.every=0"]
    run(command("lora", tiny_model_dir, tmp_path / "whole", "--backend", backend, *slow))
    # Two ranks, killed (the launcher and both ranks, SIGKILL) once the step-3 checkpoint exists.
    started = subprocess.Popen(command("lora", tiny_model_dir, tmp_path / "b", "--backend", backend, "--nproc", "2", *slow),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    state = tmp_path / "b" / "checkpoint" / "state.json"
    deadline = time.time() + 300
    while not state.exists() and started.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(started.pid, signal.SIGKILL)
    kill_every_process_naming(str(tmp_path / "b"))  # torchrun starts its workers in sessions of their own
    started.wait()
    assert state.exists()
    stopped_at = json.loads(state.read_text())["step"]
    assert 3 <= stopped_at < 12
    # Resumed in one process: the losses of the uninterrupted run.
    run([sys.executable, "-m", "mlxft.cli", "lora", "--resume", str(tmp_path / "b")])
    assert worst_difference(metrics(tmp_path / "whole"), metrics(tmp_path / "b")) < 3e-5
    assert adapter_difference(tmp_path / "whole", tmp_path / "b") < 1e-5


def test_a_rank_takes_its_share_of_rows_and_pairs():
    rows = collate([Example([1, 2, 3], [0, 1, 1]), Example([4, 5], [0, 1]), Example([6], [1])], pad_id=0)
    shares = [World(rank, 2).shard(rows) for rank in (0, 1)]
    assert [s.input_ids[:, 0].tolist() for s in shares] == [[1, 4], [6]]
    one = collate([Example([1], [1])], pad_id=0)
    assert [World(rank, 4).shard(one).lengths.size for rank in range(4)].count(0) == 3  # more ranks than rows
    pairs = collate_pairs([PreferenceExample([1], [2], [3]), PreferenceExample([4], [5], [6]),
                           PreferenceExample([7], [8], [9])], [10, 11, 12], pad_id=0)
    second = World(1, 2).shard(pairs)
    assert second.index.tolist() == [12] and second.batch.input_ids[:, :2].tolist() == [[7, 8], [7, 9]]


class TwoRanks(World):
    """Rank 0 of two, the other rank simulated: it adds `other(call, values)` to each all-sum."""

    def __init__(self, other_digest: str):
        super().__init__(0, 2)
        self.other = int(other_digest[:6], 16)
        self.calls = 0

    def all_sum(self, values):
        values = np.asarray(values, dtype=np.float32)
        self.calls += 1
        if self.calls % 2:  # "rank 0's value": rank 1 adds nothing
            return values
        return values + float(values[0] == 0 and self.other != self.rank0)  # rank 1's "I differ" flag

    def check_same(self, what, digest):
        self.rank0 = int(digest[:6], 16)
        super().check_same(what, digest)


def test_ranks_that_disagree_stop_with_one_line():
    digest = "abcdef" + "0" * 58
    with pytest.raises(UserError, match="1 of the 2 ranks disagree with rank 0 on the training data"):
        TwoRanks("123456" + "0" * 58).check_same("training data", digest)
    TwoRanks(digest).check_same("training data", digest)  # the same digest: no error


def test_a_launcher_of_the_other_backend_is_refused(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_RANK", "0")
    result = CliRunner().invoke(cli, ["lora", "--recipe", "tallrec", "--model", str(tiny_model_dir), "--backend", "torch",
                                      "--out", str(tmp_path / "run")])
    assert result.exit_code == 2 and "started by mlx.launch" in result.output and not (tmp_path / "run").exists()


def test_each_rank_steps_on_its_share_only(tiny_model_dir, tmp_path):
    # A rank of two whose all-sum adds nothing (a group of one): what its step reports is its own
    # share. Equal metrics across rank counts cannot show this: every statistic is a ratio of sums.
    from functools import partial

    import mlx.core as mx
    import mlx.optimizers as optim

    from mlxft.backends.mlx import lora, steps
    from mlxft.backends.mlx import model as mlx_model
    from mlxft.models.adapters import AdapterSpec

    rng = np.random.default_rng(0)
    rows = [Example(rng.integers(3, 500, size=12).tolist(), [0] * (12 - n) + [1] * n) for n in (1, 2, 3, 4, 5)]
    batch = collate(rows, pad_id=0)
    model, _, _ = mlx_model.load(str(tiny_model_dir))
    lora.apply_lora(model, AdapterSpec(4, 8, 0.0, ["q_proj"], "x"))
    optimizer = optim.AdamW(learning_rate=0.0)
    micro_step, update = steps.make_step(model, optimizer, partial(steps.sft_loss, split_head=True), None)
    for rank, scored in ((0, 1 + 2), (1, 3 + 4 + 5)):  # rows 0-1 and 2-4, of 1 to 5 scored tokens each
        world = World(rank, 2, "mlx", mx.distributed.init())
        step = steps.train_step(model, optimizer, micro_step, update, steps.sft_inputs, 0, world)
        assert step(0, [batch], 0.0).sums[0] == scored

    import torch
    import torch.distributed as dist

    from mlxft.backends.torch import lora as torch_lora
    from mlxft.backends.torch import model as torch_model
    from mlxft.backends.torch import steps as torch_steps
    from mlxft.backends.torch.adamw import MLXAdamW

    t, _, _ = torch_model.load(str(tiny_model_dir), device=torch.device("cpu"))
    torch_lora.apply_lora(t, AdapterSpec(4, 8, 0.0, ["q_proj"], "x"))
    optimizer = MLXAdamW([p for p in t.parameters() if p.requires_grad], lr=0.0)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        for rank, scored in ((0, 3), (1, 12)):
            step = torch_steps.train_step(optimizer, partial(torch_steps.sft_loss, t, split_head=True, device=torch.device("cpu")),
                                          seed=0, max_grad_norm=None, world=World(rank, 2, "torch"))
            assert step(0, [batch], 0.0).sums[0] == scored
    finally:
        dist.destroy_process_group()


def rank_process(text: str, rank: int) -> int | None:
    """The pid of the rank-`rank` process whose command line holds `text` (from its environment)."""
    from pathlib import Path

    for entry in Path("/proc").iterdir():
        try:
            if not entry.name.isdigit() or text not in (entry / "cmdline").read_bytes().decode(errors="replace"):
                continue
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"MLX_RANK={rank}".encode() in environ or f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_when_a_rank_dies_the_others_stop_instead_of_hanging(tiny_model_dir, tmp_path, backend):
    if backend == "torch":
        pytest.importorskip("peft")
    out = tmp_path / "run"
    started = subprocess.Popen(command("lora", tiny_model_dir, out, "--backend", backend, "--nproc", "2",
                                       "--set", "train.steps=100000", "--set", "eval.every=0"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (out / "metrics.jsonl").exists() and time.time() < deadline:  # training, both ranks in step
            time.sleep(0.1)
        victim = rank_process(str(out), 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        stopped = time.time()
        started.wait(timeout=120)
        while rank_process(str(out), 0) is not None and time.time() < stopped + 120:
            time.sleep(0.2)
        assert rank_process(str(out), 0) is None  # rank 0 stopped too
        print(f"{backend}: rank 0 gone {time.time() - stopped:.1f} s after rank 1 was killed")
    finally:
        kill_every_process_naming(str(out))
