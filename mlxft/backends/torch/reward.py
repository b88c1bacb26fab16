"""Reward models on PyTorch (CUDA, MPS or CPU): the twin of mlxft.backends.mlx.reward, with the
same loss, metric names, run folder and saved adapter (PEFT's SEQ_CLS layout). Reads top to
bottom: setup -> model -> data -> head -> optimizer -> loop -> save.

    mlxft reward --recipe reward --backend torch
    mlxft reward --recipe reward --backend torch --model HuggingFaceTB/SmolLM2-135M-Instruct --data pairs.jsonl

Supports what the MLX trainer does (mlxft.backends.mlx.reward), with LoRA through PEFT (QLoRA
through bitsandbytes on CUDA), MLX's AdamW update, bf16 autocast on CUDA and gradient
checkpointing. Raises as the MLX trainer does, and for resuming a run another backend wrote.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from mlxft import backends, driver
from mlxft.backends.torch import PAD_MULTIPLE, checkpoint, steps
from mlxft.backends.torch import model as torch_model
from mlxft.backends.torch.adamw import MLXAdamW
from mlxft.config import RunConfig
from mlxft.data.batching import iterate_pair_batches
from mlxft.distributed import World
from mlxft.dpo_common import encode_pairs
from mlxft.errors import NotImplementedYet
from mlxft.model_files import SPLIT_HEAD_TYPES
from mlxft.model_files import pad_id as pad_id_of
from mlxft.policy import build_policy, describe_policy
from mlxft.reward import (
    HEAD,
    STATISTICS,
    describe_reward,
    load_instructions,
    load_reward_data,
    reward_spec,
    saved_head,
    start_head,
    summarize,
)
from mlxft.runs import Run


def train(config: RunConfig, run: Run, *, resume: bool = False, adapter: str | None = None, echo=print,
          world: World = World()) -> dict:
    """Train as `config` says, writing into `run`; returns the summary (also in summary.json), or {}
    on a rank other than 0 of several (mlxft.distributed)."""
    tc, ec, rc = config.train, config.eval, config.reward
    backend = backends.get("torch")

    # --- setup ---------------------------------------------------------------------------------
    device = torch_model.pick_device()
    splits = load_reward_data(config)  # rows first: a data mistake should not wait for a model

    # --- model and data --------------------------------------------------------------------------
    model, tokenizer, folder = torch_model.load(config.model.name, quantize=config.model.quantize,
                                                trust_remote_code=config.model.trust_remote_code, device=device)
    if not torch_model.can_split_head(model, folder):
        raise NotImplementedYet(f"model {folder}: reward models run on the families {', '.join(sorted(SPLIT_HEAD_TYPES))} for now")
    pad_id = pad_id_of(tokenizer)
    train_set, valid_set, truncated_pairs = encode_pairs(splits, tokenizer, config, echo, lengths=rc)

    # --- adapter and head ------------------------------------------------------------------------
    torch.manual_seed(tc.seed)
    start_from = run.checkpoint_dir / "weights" if resume else adapter
    spec = reward_spec(build_policy(backend, model, config, folder, start_from=start_from, task_type=None))
    hidden = model.config.hidden_size
    setattr(model, HEAD, nn.Linear(hidden, 1, bias=False, device=device, dtype=torch.float32))
    with torch.no_grad():
        model.score.weight.copy_(torch.from_numpy(start_head(hidden, start_from, tc.seed)))
    trainable, line = describe_policy(backend, model, folder, spec, config, where=f" on {device}")
    echo(describe_reward(line, hidden, rc))
    echo(f"run folder: {run.folder}")

    # --- optimizer and step ----------------------------------------------------------------------
    named = {name: p for name, p in model.named_parameters() if p.requires_grad}
    optimizer = MLXAdamW(list(named.values()), lr=tc.learning_rate, weight_decay=tc.weight_decay,
                         bias_correction=tc.bias_correction)
    start = driver.Start()
    if resume:
        start = driver.Start(*checkpoint.load(run, model, optimizer, named, False, config.model.trust_remote_code))

    def loss_of(pairs):
        return steps.reward_loss(model, pairs, pad_id=pad_id, center_coefficient=rc.center_coefficient, device=device)

    @torch.no_grad()
    def validation_sums(pairs, rows) -> np.ndarray:
        return loss_of(pairs)[1].cpu().numpy()

    trainer = driver.Trainer(
        step=steps.train_step(optimizer, loss_of, seed=tc.seed, max_grad_norm=tc.max_grad_norm, world=world,
                              statistics=len(STATISTICS), names=list(named)),
        validate=driver.pair_validation(model, valid_set, validation_sums, summarize, statistics=len(STATISTICS),
                                        batch_size=ec.batch_size, pad_id=pad_id, pad_multiple=PAD_MULTIPLE, world=world),
        summarize=summarize,
        save_weights=lambda where: checkpoint.save_weights(where, model, spec, config, folder),
        save_checkpoint=lambda *state: checkpoint.save(run, model, optimizer, named, spec, config, folder, *state),
        memory=torch_model.memory_meter(device),
    )

    # --- loop ----------------------------------------------------------------------------------
    model.train()
    fitted = driver.fit(run, config, trainer, train_set, start=start, iterate=iterate_pair_batches, pad_id=pad_id,
                        pad_multiple=PAD_MULTIPLE, echo=echo, world=world)
    if not world.main:
        return {}

    # --- save ----------------------------------------------------------------------------------
    return driver.summarize_run(
        run, config, fitted, trainer, method="reward", backend="torch", device=str(device), model=str(folder),
        trainable=trainable, setup={"center_coefficient": rc.center_coefficient},
        data={"train_pairs": len(train_set), "valid_pairs": len(valid_set), "truncated_pairs": truncated_pairs},
        outputs={"load_with": load_instructions(pad_id)})


def swapped_scorer(model, adapter: str, pad_id: int):
    """score(input_ids [N, T]) -> scores [N] (numpy) of a reward adapter (mlxft reward, trained on
    this model's base) run on the model being trained: its LoRA weights swapped in for the forward
    (lora.adapter_swapped) and its head kept outside the model, so that nothing of it trains.
    One copy of the base weights serves the policy, the reference and the reward model."""
    from mlxft.adapters import load_adapter
    from mlxft.backends.torch import lora
    from mlxft.reward import TASK_TYPE, score_positions

    spec, weights = load_adapter(adapter, task_type=TASK_TYPE)
    device = next(model.parameters()).device
    head = head_of(adapter, model.config.hidden_size, device)

    @torch.no_grad()
    def score(input_ids: np.ndarray) -> np.ndarray:
        ids, positions = torch_model.to_device(device, input_ids, score_positions(input_ids, pad_id))
        with lora.adapter_swapped(model, weights, spec.scaling), torch_model.autocast(device):
            return steps.reward_scores(model, ids, positions, head).float().cpu().numpy()

    return score


def load_scorer(name: str, adapter: str, *, trust_remote_code: bool = False):
    """(tokenizer, score): a saved reward adapter on its base model, and a function from rows of
    token ids [N, T] (right-padded with the tokenizer's pad id) to their scores [N] (numpy)."""
    from mlxft.adapters import attach_adapter
    from mlxft.backends.torch import lora
    from mlxft.reward import TASK_TYPE, score_positions

    device = torch_model.pick_device()
    model, tokenizer, folder = torch_model.load(name, trust_remote_code=trust_remote_code, device=device)
    if not torch_model.can_split_head(model, folder):
        raise NotImplementedYet(f"model {folder}: reward models run on the families {', '.join(sorted(SPLIT_HEAD_TYPES))} for now")
    attach_adapter(lora, model, adapter, task_type=TASK_TYPE)
    head = head_of(adapter, model.config.hidden_size, device)
    model.eval()
    pad_id = pad_id_of(tokenizer)

    @torch.no_grad()
    def score(input_ids: np.ndarray) -> np.ndarray:
        ids, positions = torch_model.to_device(device, input_ids, score_positions(input_ids, pad_id))
        with torch_model.autocast(device):
            return steps.reward_scores(model, ids, positions, head).float().cpu().numpy()

    return tokenizer, score


def head_of(adapter: str, hidden_size: int, device) -> nn.Linear:
    """The reward head saved beside an adapter, as a layer outside the model (nothing trains it)."""
    head = nn.Linear(hidden_size, 1, bias=False, device=device, dtype=torch.float32).requires_grad_(False)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(saved_head(adapter, hidden_size)))
    return head
