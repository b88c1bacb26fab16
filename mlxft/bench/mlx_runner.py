"""Time a workload on MLX with the trainers' own compiled steps (mlxft.backends.mlx.sft.make_step,
mlxft.backends.mlx.dpo.make_step / make_reference_step), step by step as their loops run them."""

from __future__ import annotations

import time

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_map

from mlxft.backends.mlx import lora
from mlxft.backends.mlx import model as mlx_model
from mlxft.bench import memory
from mlxft.bench.workload import Workload, distinct_shapes, initial_adapter, shared_layout, step_record
from mlxft.data.batching import scored_targets
from mlxft.schedule import learning_rate


def run(workload: Workload) -> dict:
    config, tc = workload.config, workload.config.train
    mx.random.seed(tc.seed)
    mlx_model.configure_memory()
    model, _, folder = mlx_model.load(str(workload.model_dir), quantize=config.model.quantize,
                                      trust_remote_code=config.model.trust_remote_code)
    split_head = mlx_model.can_split_head(model, folder)
    lora.apply_lora(model, workload.spec)
    shapes = {path: (b.shape[0], a.shape[1]) for path, (a, b) in lora.adapter_weights(model).items()}  # (out, in)
    lora.set_adapter_weights(model, initial_adapter(shapes, workload.spec.r, tc.seed))
    optimizer = optim.AdamW(learning_rate=tc.learning_rate, weight_decay=tc.weight_decay,
                            bias_correction=tc.bias_correction)
    state = [model.state, optimizer.state, mx.random.state]
    shared = workload.name == "dpo" and config.dpo.share_prompt and mlx_model.can_share_prompts(model, folder)
    layout = shared_layout(workload, "mlx") if shared else None
    if workload.name == "dpo":
        from mlxft.backends.mlx import dpo

        micro_step, update = dpo.make_step(model, optimizer, split_head, tc.max_grad_norm, config.dpo)
        reference_step = dpo.make_reference_step(model, split_head)

        def arrays_of(batch):  # as the trainer lays out a pair batch
            return dpo.batch_arrays(batch, workload.pad_id, shared, workload.pad_multiple)
    else:
        from mlxft.backends.mlx import sft

        micro_step, update = sft.make_step(model, optimizer, split_head, tc.max_grad_norm)

        def arrays_of(batch):
            targets = scored_targets(batch)
            return (mx.array(batch.input_ids[:, :-1]), mx.array(targets.positions), mx.array(targets.tokens),
                    mx.array(targets.weights))
    model.train()

    # mx.compile traces a step again for every new batch shape. Trace each shape of the run first,
    # so the timed steps measure the steady state of a long run. Calling a compiled function
    # traces it; its outputs are dropped unevaluated, so nothing is computed and no weight,
    # optimizer or random state changes (measured on SmolLM-135M's shape: ~0.2 s a shape).
    start = time.perf_counter()
    for arrays in distinct_shapes(workload, arrays_of):
        if workload.name == "dpo":
            reference_step(arrays)
            micro_step(arrays, mx.zeros((arrays["weights"].shape[0],), mx.float32))
        else:
            micro_step(*arrays)
    trace_seconds = time.perf_counter() - start

    records = []
    total = len(workload.steps)
    for step, micro_batches in enumerate(workload.steps):
        if step == workload.warmup:  # peaks of the timed steps only
            mx.reset_peak_memory()
            memory.reset_peak()
        mx.random.seed(tc.seed * 1_000_003 + step)  # as the trainers seed each step
        start, cpu_start = time.perf_counter(), time.process_time()
        grads, step_loss, step_count = None, None, None
        for batch in micro_batches:
            arrays = arrays_of(batch)
            if workload.name == "dpo":
                reference = reference_step(arrays)
                mx.eval(reference)  # as dpo.train: the reference's activations are gone before the policy's forward
                micro_grads, sums = micro_step(arrays, reference)
                loss_sum, count = sums[1], sums[0]  # STATISTICS: pairs, loss, ...
            else:
                loss_sum, count, micro_grads = micro_step(*arrays)
            grads = micro_grads if grads is None else tree_map(mx.add, grads, micro_grads)
            step_loss = loss_sum if step_loss is None else step_loss + loss_sum
            step_count = count if step_count is None else step_count + count
        optimizer.learning_rate = learning_rate(step, peak=tc.learning_rate, total_steps=total,
                                                warmup_steps=tc.warmup_steps, schedule=tc.schedule,
                                                minimum=tc.min_learning_rate)
        grad_norm = update(grads, step_count)
        mx.eval(state, step_loss, step_count, grad_norm)
        mlx_model.trim_cache()
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        records.append(step_record(step, workload, micro_batches, seconds, step_loss.item() / step_count.item(),
                                   grad_norm.item(), cpu_seconds, layout))
    return {
        "backend": "mlx",
        "device": str(mx.default_device()),
        "split_head": split_head,
        "shared_prompts": shared,
        "trainable_parameters": lora.trainable_parameters(model),
        "total_parameters": lora.total_parameters(model),
        "peak_memory_gb": mlx_model.peak_memory_gb(),
        "peak_memory_kind": "MLX allocator peak",
        "peak_rss_gb": memory.peak_rss_gb(),
        "shape_warmup_seconds": trace_seconds,
        "steps": records,
    }
