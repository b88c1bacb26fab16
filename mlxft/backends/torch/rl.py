"""Online RL on PyTorch (CUDA, MPS or CPU): the twin of mlxft.backends.mlx.rl, with the same
rollouts, losses (mlxft.rl), reward functions, metric names and run folder. Reads top to bottom:
setup -> model -> data -> policy -> optimizer -> rollouts and step -> loop -> save.

    mlxft rl --recipe grpo --backend torch
    mlxft rl --recipe grpo --backend torch --model HuggingFaceTB/SmolLM2-135M-Instruct

The reference is the model with its LoRA layers switched off (lora.adapter_off), run under
torch.no_grad(), and a reward model (rl.reward_adapter) the model with its adapter swapped in
(lora.adapter_swapped): one copy of the base weights for all three. Each prompt's G completions are sampled together
from one run of the prompt (its KV cache repeated for G rows; generate.sample_completions).

Supports what the MLX trainer does (see its docstring), with LoRA through PEFT (QLoRA through
bitsandbytes on CUDA), MLX's AdamW update and bf16 autocast on CUDA. Raises as the MLX trainer
does, and for resuming a run another backend wrote.
"""

from __future__ import annotations

import torch

from mlxft import backends, driver
from mlxft.backends.torch import PAD_MULTIPLE, checkpoint, reward, steps
from mlxft.backends.torch import model as torch_model
from mlxft.backends.torch.adamw import MLXAdamW
from mlxft.backends.torch.generate import sample_completions
from mlxft.config import RunConfig
from mlxft.data.batching import scored_targets
from mlxft.distributed import World
from mlxft.model_files import pad_id as pad_id_of
from mlxft.policy import build_policy, describe_policy
from mlxft.rl import (
    check_ppo,
    describe_rl,
    encode_prompts,
    iterate_prompt_batches,
    load_rl_data,
    reward_names,
    statistic_names,
    stop_ids,
    summarizer,
    value_head_init,
)
from mlxft.rollouts import CompletionLog, Rollouts, advantages_of, row_passes, split_passes
from mlxft.runs import Run


def train(config: RunConfig, run: Run, *, resume: bool = False, adapter: str | None = None, echo=print,
          world: World = World()) -> dict:
    """Train as `config` says, writing into `run`; returns the summary (also in summary.json)."""
    tc, rc = config.train, config.rl
    backend = backends.get("torch")

    # --- setup ---------------------------------------------------------------------------------
    device = torch_model.pick_device()
    splits, functions = load_rl_data(config, adapter, world)  # rows and reward functions first: a mistake should not wait for a model

    # --- model and data --------------------------------------------------------------------------
    model, tokenizer, folder = torch_model.load(config.model.name, quantize=config.model.quantize,
                                                trust_remote_code=config.model.trust_remote_code, device=device)
    split_head = torch_model.can_split_head(model, folder)
    pad_id, stop = pad_id_of(tokenizer), stop_ids(tokenizer)
    train_set, valid_set, truncated = encode_prompts(splits, tokenizer, config, echo)

    # --- policy ----------------------------------------------------------------------------------
    torch.manual_seed(tc.seed)
    spec = build_policy(backend, model, config, folder, start_from=run.checkpoint_dir / "weights" if resume else adapter)
    ppo = rc.algo == "ppo"
    if ppo:  # trained in full beside the adapter, on the policy's own hidden states
        check_ppo(split_head)
        hidden = model.config.hidden_size
        model.value_head = torch.nn.Linear(hidden, 1, device=device, dtype=torch.float32)
        with torch.no_grad():
            model.value_head.weight.copy_(torch.from_numpy(value_head_init(hidden, tc.seed)))
            model.value_head.bias.zero_()
    trainable, line = describe_policy(backend, model, folder, spec, config, where=f" on {device}")
    echo(describe_rl(line, rc, functions))
    echo(f"run folder: {run.folder}")

    # --- optimizer and step ----------------------------------------------------------------------
    named = {name: p for name, p in model.named_parameters() if p.requires_grad}
    optimizer = MLXAdamW(list(named.values()), lr=tc.learning_rate, weight_decay=tc.weight_decay,
                         bias_correction=tc.bias_correction)
    start = driver.Start()
    if resume:
        start = driver.Start(*checkpoint.load(run, model, optimizer, named, False, config.model.trust_remote_code))
        if ppo:
            heads = checkpoint.load_heads(run, device)
            model.value_head.load_state_dict({k.removeprefix("value_head."): v for k, v in heads.items()})
    names = reward_names(functions, rc)
    log = CompletionLog(run.folder / "completions.jsonl", rc.log_completions_every, names)
    if resume:
        log.truncate(start.step)
    rollouts = Rollouts(
        sample=lambda prompt_ids, n: sample_completions(model, prompt_ids, n, max_tokens=rc.max_completion_length,
                                                        temperature=rc.temperature, top_p=rc.top_p, stop=stop),
        greedy=lambda prompt_ids: sample_completions(model, prompt_ids, 1, max_tokens=rc.max_completion_length,
                                                     temperature=0.0, stop=stop)[0],
        tokenizer=tokenizer, splits=splits, valid_set=valid_set, functions=functions, rc=rc, pad_id=pad_id,
        pad_multiple=PAD_MULTIPLE, stop=stop,
        reward_model=reward.swapped_scorer(model, rc.reward_adapter, pad_id) if rc.reward_adapter else None, log=log)

    def without_gradients(passes, inputs, positions, tokens) -> tuple:
        """The reference's log-probs, π_old's and its values, pass by pass (zeros where not needed)."""
        reference, old_logps, old_values = [], [], []
        for rows in passes:
            one = (inputs[rows], positions[rows], tokens[rows])
            zeros = torch.zeros(one[2].shape, device=device)
            with torch_model.autocast(device):
                reference.append(steps.reference_token_logps(model, *one, split_head=split_head, chunk=tc.head_chunk) if rc.beta else zeros)
                old = (steps.old_policy_outputs(model, *one, split_head=split_head, ppo=ppo, chunk=tc.head_chunk)
                       if ppo or rc.num_iterations > 1 else (zeros, zeros))
            old_logps.append(old[0])
            old_values.append(old[1])
        return tuple(torch.cat(parts).float() for parts in (reference, old_logps, old_values))

    def passes_of(batch) -> list[tuple]:
        rollout = rollouts.make(batch)
        targets = scored_targets(rollout.batch)
        inputs, positions, tokens, weights = torch_model.to_device(device, rollout.batch.input_ids[:, :-1], targets.positions,
                                                                   targets.tokens, targets.weights)
        passes = row_passes(len(inputs), rc.completions_per_pass)
        reference, old_logps, old_values = without_gradients(passes, inputs, positions, tokens)
        advantages, returns = advantages_of(rollout, *(t.cpu().numpy() for t in (old_logps, reference, old_values, weights)),
                                            rc)
        advantages, returns, carried = torch_model.to_device(device, advantages, returns, rollout.carried)
        return split_passes((inputs, positions, tokens, weights, reference, old_logps, old_values, advantages, returns),
                            carried, torch.zeros_like(carried), passes)

    def loss_of(inputs: tuple):
        with torch_model.autocast(device):
            return steps.rl_loss(model, *inputs, split_head=split_head, rc=rc, chunk=tc.head_chunk)

    trainer = driver.Trainer(
        step=rollouts.counting(steps.train_step(optimizer, loss_of, seed=tc.seed, max_grad_norm=tc.max_grad_norm,
                                                world=world, statistics=len(statistic_names(names)), passes_of=passes_of,
                                                updates=rc.num_iterations, names=list(named))),
        validate=rollouts.validate,
        summarize=summarizer(names, ppo),
        save_weights=lambda where: checkpoint.save_weights(where, model, spec, config, folder),
        save_checkpoint=lambda *state: checkpoint.save(
            run, model, optimizer, named, spec, config, folder, *state,
            heads={f"value_head.{k}": v for k, v in model.value_head.state_dict().items()} if ppo else None),
        memory=torch_model.memory_meter(device),
        waits_for_signal=True,
    )

    # --- loop ----------------------------------------------------------------------------------
    model.train()
    fitted = driver.fit(run, config, trainer, train_set, start=start, iterate=iterate_prompt_batches, pad_id=pad_id,
                        pad_multiple=PAD_MULTIPLE, echo=echo, world=world)

    # --- save ----------------------------------------------------------------------------------
    return driver.summarize_run(
        run, config, fitted, trainer, method="rl", backend="torch", device=str(device), model=str(folder),
        trainable=trainable, setup={"algo": rc.algo, "loss_type": rc.loss_type, "beta": rc.beta,
                                    "num_generations": rc.num_generations, "num_iterations": rc.num_iterations,
                                    "reward_functions": list(rc.reward_functions)},
        data={"train_prompts": len(train_set), "valid_prompts": len(valid_set), "truncated_prompts": truncated},
        outputs={"completions": str(log.path) if log.path.exists() else None})
