"""Data parallelism on the engines users already have: MLX's mx.distributed (several Macs, or
processes on one machine; launched by `mlx.launch`, ring or MPI) and PyTorch's torch.distributed
(several GPUs or CPU processes; launched by `torchrun`, NCCL on CUDA, gloo elsewhere).

    mlx.launch -n 2 --backend ring -- mlxft lora --recipe tallrec --backend mlx
    torchrun --nproc-per-node 2 -m mlxft.cli lora --recipe tallrec --backend torch
    mlxft lora --recipe tallrec --nproc 2            # the same, through the right launcher

Semantics: train.batch_size stays the global batch. Every rank draws the same micro-batches
(the batch stream depends only on the seed) and trains on its share of each one's rows; the
gradient sums and the step's statistic sums are added across ranks before the update divides by
the global count, so N ranks take the step one process takes on the same batch (equal up to the
order of float additions). Rank 0 alone writes the run folder; evaluation is sharded and reduced.
"""

from __future__ import annotations

import atexit
import hashlib
import os
from dataclasses import dataclass, replace

import numpy as np

from mlxft.data.batching import Batch, PairBatch
from mlxft.errors import UserError

# How long a PyTorch rank waits for the others in a collective. The launchers stop every rank
# when one exits with an error; this bounds the rest. Long, because the other ranks wait for rank 0
# while it alone writes checkpoints and answers the "before" prompts.
TIMEOUT_SECONDS = 3600


@dataclass
class World:
    """This process's place among the ranks of one run; one process is World() (rank 0 of 1)."""

    rank: int = 0
    size: int = 1
    backend: str | None = None  # "mlx" or "torch" when there are several ranks
    group: object = None  # the MLX group

    @property
    def main(self) -> bool:
        """The rank that writes the run folder and prints."""
        return self.rank == 0

    def all_sum(self, values) -> np.ndarray:
        """The element-wise sum of `values` over every rank, on every rank (float32)."""
        values = np.ascontiguousarray(values, dtype=np.float32)
        if self.size == 1:
            return values
        if self.backend == "mlx":
            import mlx.core as mx

            return np.array(mx.distributed.all_sum(mx.array(values), group=self.group))
        import torch
        import torch.distributed as dist

        tensor = torch.from_numpy(values.copy())
        if dist.get_backend() == "nccl":
            tensor = tensor.cuda()
        dist.all_reduce(tensor)
        return tensor.cpu().numpy()

    def barrier(self) -> None:
        self.all_sum(np.zeros(1))

    def check_same(self, what: str, digest: str) -> None:
        """A UserError on every rank unless every rank has the same digest (of its config or data)."""
        if self.size == 1:
            return
        value = int(digest[:6], 16)  # < 2**24: exact in float32
        rank0 = self.all_sum([value if self.main else 0])[0]  # rank 0's value, on every rank
        differ = self.all_sum([float(rank0 != value)])[0]  # how many ranks hold another one
        if differ:
            raise UserError(f"{int(differ)} of the {self.size} ranks disagree with rank 0 on the {what}; start every "
                            "rank with the same command, files and mlxft version")

    def shard(self, batch):
        """This rank's share of a micro-batch: contiguous rows (pairs, for a PairBatch); a rank may
        get none when the batch has fewer rows than there are ranks."""
        if self.size == 1:
            return batch
        if isinstance(batch, PairBatch):
            rows = self.share(batch.pairs)
            both = np.concatenate([rows, rows + batch.pairs])
            return PairBatch(rows_of(batch.batch, both), batch.index[rows])
        return rows_of(batch, self.share(len(batch.lengths)))

    def share(self, n: int) -> np.ndarray:
        """The indices of this rank's share of n items: contiguous, sizes differing by one at most."""
        bounds = np.linspace(0, n, self.size + 1).round().astype(int)
        return np.arange(bounds[self.rank], bounds[self.rank + 1])


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The random seed of a training step (dropout), a function of the step so that a resumed run
    draws what an uninterrupted one drew. Each rank draws its own masks for its own rows; rank 0's
    seed is one process's. With dropout, N ranks therefore train like one process in distribution,
    not mask for mask; without it, step for step."""
    return seed * 1_000_003 + step + rank * 1_000_000_007


def rows_of(batch: Batch, rows: np.ndarray) -> Batch:
    return replace(batch, input_ids=batch.input_ids[rows], loss_mask=batch.loss_mask[rows], lengths=batch.lengths[rows],
                   segment_ids=None if batch.segment_ids is None else batch.segment_ids[rows])


def empty(batch) -> bool:
    return (batch.pairs if isinstance(batch, PairBatch) else len(batch.lengths)) == 0


def launched_by() -> str | None:
    """Which launcher started this process with other ranks: 'mlx' (mlx.launch), 'torch'
    (torchrun) or None."""
    if "MLX_RANK" in os.environ:
        return "mlx"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return "torch"
    return None


def init(backend: str) -> World:
    """This process's World for a run on `backend` ('mlx' or 'torch'), joining the other ranks
    when a launcher started several; a UserError when the launcher is the other backend's."""
    launcher = launched_by()
    if launcher is None:
        return World()
    if launcher != backend:
        tool = {"mlx": "mlx.launch", "torch": "torchrun"}
        raise UserError(f"this run was started by {tool[launcher]}, which launches the {launcher} backend; "
                        f"use --backend {launcher}, or start the {backend} backend with {tool[backend]}")
    if backend == "mlx":
        import mlx.core as mx

        group = mx.distributed.init(strict=True)
        return World(group.rank(), group.size(), "mlx", group)
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                timeout=timedelta(seconds=TIMEOUT_SECONDS))
        atexit.register(dist.destroy_process_group)  # gloo may abort a process that exits with its group up
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return World(dist.get_rank(), dist.get_world_size(), "torch")


def launch(backend: str, nproc: int, argv: list[str]) -> int:
    """Run `python -m mlxft.cli <argv>` as nproc ranks on this machine through the backend's own
    launcher (mlx.launch with the ring backend over loopback; torchrun), and return its exit code.
    For several machines, call the launcher yourself (a hostfile for mlx.launch, --nnodes for torchrun)."""
    import shutil
    import subprocess
    import sys

    if backend == "mlx":
        launcher = shutil.which("mlx.launch") or sys.exit("mlx.launch is not on PATH; it comes with the mlx package")
        command = [launcher, "-n", str(nproc), "--backend", "ring", "--", sys.executable, "-m", "mlxft.cli", *argv]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "-m", "mlxft.cli", *argv]
    return subprocess.call(command)


def without_option(argv: list[str], name: str) -> list[str]:
    """argv without `name VALUE` / `name=VALUE`."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == name:
            skip = True
        elif not item.startswith(name + "="):
            out.append(item)
    return out


def data_digest(examples) -> str:
    """A digest of encoded examples (their token ids and masks), to check that ranks agree."""
    digest = hashlib.sha256(str(len(examples)).encode())
    for example in examples:
        for field in vars(example).values():
            if isinstance(field, (list, tuple)):  # token ids, masks, packed lengths; not the origin, a file name
                digest.update(np.asarray(field, dtype=np.int64).tobytes())
    return digest.hexdigest()


def check_fsdp(config, method: str, backend: str) -> None:
    """What train.fsdp (sharded full fine-tuning) cannot do, said before a model loads."""
    from mlxft.errors import NotImplementedYet, UserError

    if not config.train.fsdp:
        return
    if backend != "torch":
        raise UserError("train.fsdp shards a full fine-tune across PyTorch ranks (--backend torch with --nproc N or "
                        "torchrun); MLX's ranks (mx.distributed, --nproc N) run data parallelism, each holding the whole model")
    if not config.lora.full_finetune:
        raise UserError("train.fsdp shards full fine-tuning (lora.full_finetune=true); a LoRA adapter is small enough "
                        "that each rank keeps it whole: drop train.fsdp")
    if method != "sft":
        raise NotImplementedYet(f"train.fsdp is built for mlxft lora (SFT) so far, not {method}")
    if config.eval.generate_examples:
        raise NotImplementedYet("train.fsdp does not answer held-out rows after training yet (rank 0 alone would run "
                                "a model whose weights every rank holds a share of): --set eval.generate_examples=0")
