"""Time a workload on PyTorch with the trainers' own step (mlxft.backends.torch.steps, MLX's AdamW
update), step by step."""

from __future__ import annotations

import time
from functools import partial

import numpy as np
import torch

from mlxft import memory
from mlxft.backends.torch import lora, steps
from mlxft.backends.torch import model as torch_model
from mlxft.backends.torch.adamw import MLXAdamW
from mlxft.bench.workload import Workload, initial_adapter, shared_layout, step_record
from mlxft.data.batching import PairBatch, scored_targets
from mlxft.reward import HEAD
from mlxft.rl import reward_sums_size
from mlxft.schedule import learning_rate


def run(workload: Workload, threads: int | None = None) -> dict:
    config, tc = workload.config, workload.config.train
    if threads:
        torch.set_num_threads(threads)
    device = torch_model.pick_device()
    model, _, folder = torch_model.load(str(workload.model_dir), quantize=config.model.quantize,
                                        trust_remote_code=config.model.trust_remote_code, device=device)
    split_head = torch_model.can_split_head(model, folder)
    torch.manual_seed(tc.seed)
    lora.apply_lora(model, workload.spec)
    shapes = {path: (b.shape[0], a.shape[1]) for path, (a, b, *_) in lora.adapter_weights(model).items()}  # (out, in)
    lora.set_adapter_weights(model, initial_adapter(shapes, workload.spec.r, tc.seed))
    if workload.name == "reward":  # the reward model's scalar head, trainable, as mlxft.backends.torch.reward adds it
        setattr(model, HEAD, torch.nn.Linear(model.config.hidden_size, 1, bias=False, device=device, dtype=torch.float32))
    if workload.name == "rl" and config.rl.algo == "ppo":  # PPO's value head, as mlxft.backends.torch.rl adds it
        model.value_head = torch.nn.Linear(model.config.hidden_size, 1, device=device, dtype=torch.float32)
    optimizer = MLXAdamW([p for p in model.parameters() if p.requires_grad], lr=tc.learning_rate,
                         weight_decay=tc.weight_decay, bias_correction=tc.bias_correction)
    shared = workload.name == "dpo" and config.dpo.share_prompt and torch_model.can_share_prompts(model, folder)
    layout = shared_layout(workload, "torch") if shared else None
    if workload.name == "dpo":
        def loss_of(batch):  # as dpo.train: the reference under no_grad, then the policy's forward
            tensors = steps.pair_tensors(batch, workload.pad_id, shared, device, workload.pad_multiple)
            with torch_model.autocast(device):
                reference = steps.reference_logps(model, tensors, split_head=split_head)
                return steps.pair_loss(model, tensors, reference, split_head=split_head, dc=config.dpo)
    elif workload.name == "rl":  # one training pass of a rollout: the reference's log-probs, then the policy loss
        rc = config.rl
        carried = reward_sums_size(len(rc.reward_functions))

        def loss_of(batch):
            targets = scored_targets(batch)
            inputs, positions, tokens, weights = torch_model.to_device(device, batch.input_ids[:, :-1], targets.positions,
                                                                       targets.tokens, targets.weights)
            zeros = torch.zeros(tokens.shape, device=device)
            with torch_model.autocast(device):
                reference = (steps.reference_token_logps(model, inputs, positions, tokens, split_head=split_head).float()
                             if rc.beta else zeros)
                advantages = torch.ones(tokens.shape if rc.algo == "ppo" else (len(inputs),), device=device)  # PPO's are per token
                return steps.rl_loss(model, inputs, positions, tokens, weights, reference, zeros, zeros, advantages, zeros,
                                     torch.zeros(carried, device=device), split_head=split_head, rc=rc)
    elif workload.name == "reward":
        def loss_of(batch):  # 2B rows, chosen first
            pairs = PairBatch(batch, np.arange(len(batch.lengths) // 2))
            return steps.reward_loss(model, pairs, pad_id=workload.pad_id, center_coefficient=config.reward.center_coefficient,
                                     device=device)
    else:
        loss_of = partial(steps.sft_loss, model, split_head=split_head, device=device)
    step_of = steps.train_step(optimizer, loss_of, seed=tc.seed, max_grad_norm=tc.max_grad_norm)
    model.train()

    records, peak_rss = [], 0.0
    on_cpu = device.type == "cpu"
    total = len(workload.steps)
    for step, micro_batches in enumerate(workload.steps):
        timed = step >= workload.warmup
        if timed:  # each timed step's own peak (mlxft plan reads them step by step)
            torch_model.reset_peak_memory(device)
            memory.reset_peak()
        rate = learning_rate(step, peak=tc.learning_rate, total_steps=total, warmup_steps=tc.warmup_steps,
                             schedule=tc.schedule, minimum=tc.min_learning_rate)
        start, cpu_start = time.perf_counter(), time.process_time()
        result = step_of(step, micro_batches, rate)  # ends with the step's one device sync
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        step_peak = (memory.peak_rss_gb() if on_cpu else torch_model.peak_memory_gb(device)) if timed else None
        records.append(step_record(step, workload, micro_batches, seconds, float(result.sums[1] / result.sums[0]),
                                   result.grad_norm, cpu_seconds, layout, peak_memory_gb=step_peak))
        peak_rss = max(peak_rss, memory.peak_rss_gb()) if timed else peak_rss
    return {
        "backend": "torch",
        "device": str(device),
        "split_head": split_head,
        "shared_prompts": shared,
        "trainable_parameters": lora.trainable_parameters(model),
        "total_parameters": lora.total_parameters(model),
        "peak_memory_gb": max(r["peak_memory_gb"] for r in records if r["timed"]),
        "peak_memory_kind": "process RSS (torch keeps no CPU allocator peak)" if on_cpu else f"{device.type} allocator peak",
        "peak_rss_gb": peak_rss,
        "threads": torch.get_num_threads(),
        "steps": records,
    }

