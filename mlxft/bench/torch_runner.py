"""Time a workload on PyTorch with the trainer's own step pieces (mlxft.backends.torch.sft's
micro_step and update, MLX's AdamW update), step by step as its loop runs them."""

from __future__ import annotations

import time

import torch

from mlxft.backends.torch import lora
from mlxft.backends.torch import model as torch_model
from mlxft.backends.torch.adamw import MLXAdamW
from mlxft.bench import memory
from mlxft.bench.workload import Workload, initial_adapter, shared_layout, step_record
from mlxft.schedule import learning_rate


class NotAvailable(Exception):
    """This backend cannot run this workload here; the message says why (shown in the table)."""


def run(workload: Workload, threads: int | None = None) -> dict:
    config, tc = workload.config, workload.config.train
    if threads:
        torch.set_num_threads(threads)
    device = torch_model.pick_device()
    if workload.name == "dpo":
        step_pieces = _dpo_pieces()  # before loading a model: fail fast when there is no PyTorch DPO
    model, _, folder = torch_model.load(str(workload.model_dir), quantize=config.model.quantize,
                                        trust_remote_code=config.model.trust_remote_code, device=device)
    split_head = torch_model.can_split_head(model, folder)
    torch.manual_seed(tc.seed)
    lora.apply_lora(model, workload.spec)
    shapes = {path: (b.shape[0], a.shape[1]) for path, (a, b) in lora.adapter_weights(model).items()}  # (out, in)
    lora.set_adapter_weights(model, initial_adapter(shapes, workload.spec.r, tc.seed))
    optimizer = MLXAdamW([p for p in model.parameters() if p.requires_grad], lr=tc.learning_rate,
                         weight_decay=tc.weight_decay, bias_correction=tc.bias_correction)
    shared = workload.name == "dpo" and config.dpo.share_prompt and torch_model.can_share_prompts(model, folder)
    layout = shared_layout(workload, "torch") if shared else None
    if workload.name == "dpo":
        micro_step, update = step_pieces(model, split_head, device, config.dpo, workload.pad_id, shared, workload.pad_multiple)
    else:
        from mlxft.backends.torch import sft

        def micro_step(batch):
            loss_sum, n_tokens = sft.micro_step(model, batch, split_head, device)
            return loss_sum, n_tokens

        update = sft.update
    model.train()

    records = []
    total = len(workload.steps)
    for step, micro_batches in enumerate(workload.steps):
        if step == workload.warmup:  # peaks of the timed steps only
            torch_model.reset_peak_memory(device)
            memory.reset_peak()
        torch.manual_seed(tc.seed * 1_000_003 + step)  # as the trainer seeds each step
        start, cpu_start = time.perf_counter(), time.process_time()
        optimizer.zero_grad(set_to_none=True)
        step_loss, step_count = torch.zeros((), device=device), 0.0
        for batch in micro_batches:
            loss_sum, count = micro_step(batch)
            step_loss, step_count = step_loss + loss_sum, step_count + count
        rate = learning_rate(step, peak=tc.learning_rate, total_steps=total, warmup_steps=tc.warmup_steps,
                             schedule=tc.schedule, minimum=tc.min_learning_rate)
        grad_norm = update(optimizer, step_count, rate, tc.max_grad_norm)
        step_loss = step_loss.item()  # the device sync that ends the step
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        records.append(step_record(step, workload, micro_batches, seconds, step_loss / step_count, grad_norm, cpu_seconds,
                                   layout))
    on_cpu = device.type == "cpu"
    return {
        "backend": "torch",
        "device": str(device),
        "split_head": split_head,
        "shared_prompts": shared,
        "trainable_parameters": lora.trainable_parameters(model),
        "total_parameters": lora.total_parameters(model),
        "peak_memory_gb": memory.peak_rss_gb() if on_cpu else torch_model.peak_memory_gb(device),
        "peak_memory_kind": "process RSS (torch keeps no CPU allocator peak)" if on_cpu else f"{device.type} allocator peak",
        "peak_rss_gb": memory.peak_rss_gb(),
        "threads": torch.get_num_threads(),
        "steps": records,
    }


def _dpo_pieces():
    """make(model, split_head, device, dc, pad_id, shared, pad_multiple) -> (micro_step(batch) -> (loss
    sum, pairs), update), the pair batches laid out as the trainer does (pad_multiple: the bench's); from
    mlxft.backends.torch.dpo's own pieces, as its loop calls them (reference under no_grad, then
    the policy's forward and backward)."""
    try:
        from mlxft.backends.torch import dpo
    except ImportError:
        raise NotAvailable("no PyTorch DPO trainer in this mlxft (mlxft.backends.torch.dpo)") from None
    if not all(hasattr(dpo, name) for name in ("micro_step", "reference_logps")):
        raise NotAvailable("mlxft.backends.torch.dpo has no micro_step / reference_logps for the bench to call")
    from mlxft.backends.torch import sft

    def make(model, split_head, device, dc, pad_id, shared, pad_multiple):
        def micro_step(batch):
            tensors = dpo.batch_tensors(batch, pad_id, shared, device, pad_multiple)
            with torch_model.autocast(device):
                reference = dpo.reference_logps(model, tensors, split_head=split_head)
            sums = dpo.micro_step(model, tensors, reference, split_head=split_head, dc=dc, device=device)
            return sums[1], len(batch.lengths) // 2  # STATISTICS: pairs, loss, ...; rows are chosen then rejected

        return micro_step, sft.update

    return make
