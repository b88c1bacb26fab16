"""Time a workload on one backend with the trainers' own step: the engine's step builders
(mlxft.backends.engine), the very steps mlxft.methods run, step by step."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from mlxft.backends import engine_for
from mlxft.bench.workload import Workload, initial_adapter, shared_layout, step_record
from mlxft.config import ModelConfig
from mlxft.data.batching import Batch, PairBatch
from mlxft.losses.rl import reward_sums_size, statistic_names
from mlxft.models.heads import init_head, value_head_init
from mlxft.train import memory
from mlxft.train.schedule import learning_rate


@dataclass
class BenchRollout:
    """A workload's rows as one training pass of an RL rollout: the completions are the rows
    themselves and every advantage is 1, so the bench times the step, not the sampling."""

    batch: Batch
    carried: np.ndarray


class BenchRollouts:
    def __init__(self, reward_functions: int):
        self.carried = np.zeros(reward_sums_size(reward_functions), np.float32)

    def make(self, batch: Batch) -> BenchRollout:
        return BenchRollout(batch, self.carried)


def unit_advantages(rollout, old_logps, reference, old_values, weights, rc) -> tuple[np.ndarray, np.ndarray]:
    """(advantages, returns): 1 per completion (per token for PPO, whose are), returns 0."""
    shape = weights.shape if rc.algo == "ppo" else (len(weights),)
    return np.ones(shape, np.float32), np.zeros(weights.shape, np.float32)


def run(workload: Workload, backend: str) -> dict:
    config, tc = workload.config, workload.config.train
    engine = engine_for(backend)
    engine.start(tc.seed)
    model, _, folder = engine.load(ModelConfig(name=str(workload.model_dir), quantize=config.model.quantize,
                                               trust_remote_code=config.model.trust_remote_code))
    split_head = engine.can_split_head(model, folder)
    engine.lora.apply_lora(model, workload.spec)
    shapes = {path: (b.shape[0], a.shape[1]) for path, (a, b, *_) in engine.lora.adapter_weights(model).items()}  # (out, in)
    engine.lora.set_adapter_weights(model, initial_adapter(shapes, workload.spec.r, tc.seed))
    if tc.grad_checkpoint:  # as mlxft.train.policy sets it up for a run
        engine.model.enable_gradient_checkpointing(model, workload.spec.dropout)
    if workload.name == "reward":  # the reward model's scalar head, as mlxft.methods.reward adds it
        engine.add_reward_head(model, init_head(engine.hidden_size(model), tc.seed))
    if workload.name == "rl" and config.rl.algo == "ppo":  # PPO's value head, as mlxft.methods.rl adds it
        engine.add_value_head(model, value_head_init(engine.hidden_size(model), tc.seed))
    optimizer = engine.optimizer(model, tc)
    shared = workload.name == "dpo" and config.dpo.share_prompt and engine.can_share_prompts(model, folder, tc)
    layout = shared_layout(workload, backend) if shared else None

    def pairs(batch: Batch) -> PairBatch:  # 2B rows, chosen first, as the pair steps take them
        return PairBatch(batch, np.arange(len(batch.lengths) // 2))

    as_input = lambda batch: batch  # noqa: E731
    if workload.name == "dpo":
        method = engine.pair_step(model, optimizer, config, split_head=split_head, shared=shared, pad_id=workload.pad_id,
                                  pad_to_multiple=workload.pad_multiple)
        as_input = pairs
    elif workload.name == "reward":
        method = engine.reward_step(model, optimizer, config, pad_id=workload.pad_id)
        as_input = pairs
    elif workload.name == "rl":
        rc = config.rl
        method = engine.rl_step(model, optimizer, config, split_head=split_head,
                                rollouts=BenchRollouts(len(rc.reward_functions)), advantages=unit_advantages,
                                statistics=len(statistic_names([str(f) for f in rc.reward_functions])))
    else:
        method = engine.sft_step(model, optimizer, config, split_head=split_head)
    model.train()

    # mx.compile traces a step again for every new batch shape. Trace each batch of the run first
    # (a shape seen before costs a cache lookup), so the timed steps measure the steady state of a
    # long run. Calling a compiled function traces it; its outputs are dropped unevaluated, so
    # nothing is computed and no weight, optimizer or random state changes.
    start = time.perf_counter()
    if method.trace is not None:
        for micro in workload.steps:
            for batch in micro:
                method.trace(as_input(batch))
    trace_seconds = time.perf_counter() - start

    meter = engine.memory_meter()
    records, peak_rss = [], 0.0
    total = len(workload.steps)
    for step, micro_batches in enumerate(workload.steps):
        timed = step >= workload.warmup
        if timed:  # each timed step's own peak (mlxft plan reads them step by step)
            meter.reset_peak()
            memory.reset_peak()
        rate = learning_rate(step, peak=tc.learning_rate, total_steps=total, warmup_steps=tc.warmup_steps,
                             schedule=tc.schedule, minimum=tc.min_learning_rate)
        start, cpu_start = time.perf_counter(), time.process_time()
        result = method.step(step, [as_input(batch) for batch in micro_batches], rate)  # ends with the step's one sync
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        records.append(step_record(step, workload, micro_batches, seconds, float(result.sums[1] / result.sums[0]),
                                   result.grad_norm, cpu_seconds, layout,
                                   peak_memory_gb=meter.peak_gb() if timed else None))
        peak_rss = max(peak_rss, memory.peak_rss_gb()) if timed else peak_rss
    return {
        "backend": engine.name,
        "device": engine.device,
        "split_head": split_head,
        "shared_prompts": shared,
        "trainable_parameters": engine.lora.trainable_parameters(model),
        "total_parameters": engine.lora.total_parameters(model),
        "peak_memory_gb": max(r["peak_memory_gb"] for r in records if r["timed"]),
        "peak_memory_kind": peak_memory_kind(engine),
        "peak_rss_gb": peak_rss,
        "shape_warmup_seconds": trace_seconds,
        "steps": records,
    }


def peak_memory_kind(engine) -> str:
    """What the engine's memory meter counts, in the report's words."""
    if engine.name == "mlx":
        return "MLX allocator peak"
    if engine.device == "cpu":
        return "process RSS (torch keeps no CPU allocator peak)"
    return f"{engine.device.split(':')[0]} allocator peak"
