"""What a backend gives a training method: the contract that mlxft.methods are written against.

A method (mlxft.methods.sft, .dpo, .reward, .rl) is written once, top to bottom, and asks its
engine for everything that touches a framework: the model, the adapter's layers, the optimizer,
the checkpoint, the memory meter and the method's step. Two engines keep it:
mlxft.backends.mlx.engine.MLXEngine and mlxft.backends.torch.engine.TorchEngine;
mlxft.backends.engine_for(name) gives one.

A step builder (sft_step, reward_step, pair_step, rl_step) returns a MethodStep: the driver's
step (mlxft.train.driver.Trainer.step), and what the method's validation and the benchmark need of the
same objective. Each backend's own rules stay inside its builders: on MLX the optimizer state is
restored before the step is compiled (so build the step after `resume`), the reference traces
with the adapter off, and the reference is evaluated before the policy's forward begins.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from mlxft.config import ModelConfig, RunConfig, TrainConfig
from mlxft.train.distributed import World
from mlxft.train.driver import MemoryMeter, Start, StepResult


@dataclass
class MethodStep:
    step: Callable[..., StepResult]  # the driver's: (step index, micro-batches, learning rate, probe=False)
    # (pair batch, its pairs' rows in the split) -> the statistic sums of that batch, no gradient:
    # what validation adds up (pair methods)
    validation_sums: Callable[[Any, np.ndarray], np.ndarray] | None = None
    # batch -> None: traces the compiled step for this batch's shapes without computing anything
    # (MLX); the benchmark calls it before timing. None where nothing is compiled.
    trace: Callable[[Any], None] | None = None


class Engine(Protocol):
    name: str  # "mlx" or "torch": what run folders and summaries record
    pad_multiple: int  # batch widths are rounded up to this many tokens
    lora: Any  # the backend's LoRA module (apply_lora, adapter_off, adapter_weights, ...)
    # whether `distribute` split the weights across ranks (train.fsdp): every rank then saves, and
    # every rank runs each forward in step (validation over all rows on each)
    sharded: bool
    model: Any  # the backend's model module (is_quantized, enable_gradient_checkpointing, ...)

    # --- setup and model ---------------------------------------------------------------------
    # Before anything is loaded: the device, memory, and the seed that a new adapter is drawn from
    # after `load` (on MLX the model's construction draws from it too, so it is seeded once, here;
    # on PyTorch it is seeded again after loading, which makes the adapter a function of the seed alone).
    def start(self, seed: int) -> None: ...
    def seed(self, seed: int) -> None: ...  # seed again: DPO's adapter, whether or not its reference was scored first
    @property
    def device(self) -> str: ...
    @property
    def where(self) -> str: ...  # what the policy line adds about the device ("" or " on cuda:0")
    def load(self, model: ModelConfig) -> tuple[Any, Any, Path]: ...  # (model, tokenizer, folder)
    def can_split_head(self, model, folder: Path) -> bool: ...
    def can_pack(self, model, folder: Path) -> bool: ...
    def can_share_prompts(self, model, folder: Path, train: TrainConfig) -> bool: ...
    def hidden_size(self, model) -> int: ...
    def add_reward_head(self, model, weight: np.ndarray) -> None: ...  # model.score, trainable
    def add_value_head(self, model, weight: np.ndarray) -> None: ...  # model.value_head, trainable, bias 0
    # After the weights are set up and before the optimizer: train.fsdp shards them (PyTorch),
    # else nothing. shards(...) says what this rank holds then ({} unsharded).
    def distribute(self, model, config: RunConfig, world: World = World()) -> None: ...
    def shards(self, model, optimizer) -> dict: ...

    # --- optimizer and checkpoints -----------------------------------------------------------
    def optimizer(self, model, train: TrainConfig): ...  # AdamW over the trainable tensors
    def resume(self, run, model, optimizer, config: RunConfig) -> Start: ...  # a value head too
    def save_weights(self, folder: Path, model, spec, config: RunConfig, base_folder) -> None: ...
    def save_checkpoint(self, run, model, optimizer, spec, config: RunConfig, base_folder, step: int,
                        best: dict | None, stale: int, progress: dict | None = None) -> None: ...
    def memory_meter(self) -> MemoryMeter: ...

    # --- the methods' steps ------------------------------------------------------------------
    def sft_step(self, model, optimizer, config: RunConfig, *, split_head: bool, world: World = World()) -> MethodStep: ...
    def reward_step(self, model, optimizer, config: RunConfig, *, pad_id: int, world: World = World()) -> MethodStep: ...
    def pair_step(self, model, optimizer, config: RunConfig, *, split_head: bool, shared: bool, pad_id: int,
                  reference: Callable | None = None, labels: dict | None = None, world: World = World(),
                  pad_to_multiple: int | None = None) -> MethodStep: ...
    def score_pairs(self, model, pairs: list, *, pad_id: int, split_head: bool, shared: bool,
                    batch_size: int) -> tuple[np.ndarray, np.ndarray]: ...
    def rl_step(self, model, optimizer, config: RunConfig, *, split_head: bool, rollouts, advantages, statistics: int,
                world: World = World()) -> MethodStep: ...

    # --- answers, samples and scores ---------------------------------------------------------
    def evaluate(self, model, examples: list, *, pad_id: int, split_head: bool, batch_size: int, answer_ids=None,
                 world: World = World()) -> dict: ...
    def generate_answer(self, model, tokenizer, prompt: str, *, max_tokens: int = 64, temperature: float = 0.0,
                        top_p: float = 0.0, top_k: int = 0) -> str: ...
    def sample_completions(self, model, prompt_ids: list[int], n: int, *, max_tokens: int, temperature: float,
                           top_p: float = 1.0, stop=()) -> list: ...
    def swapped_scorer(self, model, adapter: str, pad_id: int) -> Callable[[np.ndarray], np.ndarray]: ...
    def load_scorer(self, name: str, adapter: str, *, trust_remote_code: bool = False) -> tuple: ...

    # --- models out: answering and fusing -------------------------------------------------------
    def load_generator(self, model_name: str | None, adapter=None, *, trust_remote_code: bool = False): ...
    def fuse(self, adapter, out, *, model: str | None = None, quantize: int | None = None, force: bool = False,
             trust_remote_code: bool = False): ...
