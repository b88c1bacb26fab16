"""Time a workload on MLX with the trainers' own step (mlxft.backends.mlx.steps), step by step."""

from __future__ import annotations

import time
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim

from mlxft import memory
from mlxft.backends.mlx import lora, steps
from mlxft.backends.mlx import model as mlx_model
from mlxft.bench.workload import Workload, distinct_shapes, initial_adapter, shared_layout, step_record
from mlxft.reward import HEAD, score_positions
from mlxft.rl import reward_sums_size
from mlxft.schedule import learning_rate


def run(workload: Workload) -> dict:
    config, tc = workload.config, workload.config.train
    mx.random.seed(tc.seed)
    mlx_model.configure_memory()
    model, _, folder = mlx_model.load(str(workload.model_dir), quantize=config.model.quantize,
                                      trust_remote_code=config.model.trust_remote_code)
    split_head = mlx_model.can_split_head(model, folder)
    lora.apply_lora(model, workload.spec)
    shapes = {path: (b.shape[0], a.shape[1]) for path, (a, b, *_) in lora.adapter_weights(model).items()}  # (out, in)
    lora.set_adapter_weights(model, initial_adapter(shapes, workload.spec.r, tc.seed))
    if workload.name == "reward":  # the reward model's scalar head, trainable, as mlxft.backends.mlx.reward adds it
        setattr(model, HEAD, nn.Linear(model.args.hidden_size, 1, bias=False))
    if workload.name == "rl" and config.rl.algo == "ppo":  # PPO's value head, as mlxft.backends.mlx.rl adds it
        model.value_head = nn.Linear(model.args.hidden_size, 1)
    optimizer = optim.AdamW(learning_rate=tc.learning_rate, weight_decay=tc.weight_decay,
                            bias_correction=tc.bias_correction)
    shared = workload.name == "dpo" and config.dpo.share_prompt and mlx_model.can_share_prompts(model, folder)
    layout = shared_layout(workload, "mlx") if shared else None
    if workload.name == "dpo":
        loss = partial(steps.pair_loss, split_head=split_head, dc=config.dpo)
        reference_step = steps.make_reference_step(model, split_head)

        def arrays_of(batch):  # as the trainer lays out a pair batch
            return steps.pair_arrays(batch, workload.pad_id, shared, workload.pad_multiple)

        def inputs_of(batch):
            arrays = arrays_of(batch)
            reference = reference_step(arrays)
            mx.eval(reference)  # as dpo.train: the reference's activations are gone before the policy's forward
            return arrays, reference
    elif workload.name == "rl":  # one training pass of a rollout: the reference's log-probs, then the policy loss
        rc = config.rl
        loss = partial(steps.rl_loss, split_head=split_head, rc=rc)
        reference_step = steps.make_token_reference_step(model, split_head) if rc.beta else None
        carried = reward_sums_size(len(rc.reward_functions))

        def arrays_of(batch):
            inputs, positions, tokens, weights = steps.sft_inputs(batch)
            zeros = mx.zeros(tokens.shape)
            reference = reference_step(inputs, positions, tokens) if reference_step else zeros
            mx.eval(reference)  # as the trainer: the reference's activations are gone before the policy's pass
            advantages = mx.ones(tokens.shape if rc.algo == "ppo" else (len(inputs),))  # PPO's are per token
            return inputs, positions, tokens, weights, reference, zeros, zeros, advantages, zeros, mx.zeros((carried,))
        inputs_of = arrays_of
    elif workload.name == "reward":
        loss = partial(steps.reward_loss, center_coefficient=config.reward.center_coefficient)

        def arrays_of(batch):  # 2B rows, chosen first, each scored at its last real token
            return mx.array(batch.input_ids), mx.array(score_positions(batch.input_ids, workload.pad_id))
        inputs_of = arrays_of
    else:
        loss, arrays_of = partial(steps.sft_loss, split_head=split_head), steps.sft_inputs
        inputs_of = arrays_of
    micro_step, update = steps.make_step(model, optimizer, loss, tc.max_grad_norm)
    step_of = steps.train_step(model, optimizer, micro_step, update, inputs_of, tc.seed)
    model.train()

    # mx.compile traces a step again for every new batch shape. Trace each shape of the run first,
    # so the timed steps measure the steady state of a long run. Calling a compiled function
    # traces it; its outputs are dropped unevaluated, so nothing is computed and no weight,
    # optimizer or random state changes.
    start = time.perf_counter()
    for arrays in distinct_shapes(workload, arrays_of):
        if workload.name == "dpo":
            reference_step(arrays)
            micro_step(arrays, mx.zeros((arrays["weights"].shape[0],), mx.float32))
        else:
            micro_step(*arrays)
    trace_seconds = time.perf_counter() - start

    records, peak_rss = [], 0.0
    total = len(workload.steps)
    for step, micro_batches in enumerate(workload.steps):
        timed = step >= workload.warmup
        if timed:  # each timed step's own peak (mlxft plan reads them step by step)
            mx.reset_peak_memory()
            memory.reset_peak()
        rate = learning_rate(step, peak=tc.learning_rate, total_steps=total, warmup_steps=tc.warmup_steps,
                             schedule=tc.schedule, minimum=tc.min_learning_rate)
        start, cpu_start = time.perf_counter(), time.process_time()
        result = step_of(step, micro_batches, rate)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        records.append(step_record(step, workload, micro_batches, seconds, float(result.sums[1] / result.sums[0]),
                                   result.grad_norm, cpu_seconds, layout,
                                   peak_memory_gb=mlx_model.peak_memory_gb() if timed else None))
        peak_rss = max(peak_rss, memory.peak_rss_gb()) if timed else peak_rss
    return {
        "backend": "mlx",
        "device": str(mx.default_device()),
        "split_head": split_head,
        "shared_prompts": shared,
        "trainable_parameters": lora.trainable_parameters(model),
        "total_parameters": lora.total_parameters(model),
        "peak_memory_gb": max(r["peak_memory_gb"] for r in records if r["timed"]),
        "peak_memory_kind": "MLX allocator peak",
        "peak_rss_gb": peak_rss,
        "shape_warmup_seconds": trace_seconds,
        "steps": records,
    }
