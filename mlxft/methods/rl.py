"""Online RL on either backend: GRPO (with the Dr. GRPO and DAPO losses), RLOO and PPO from prompts and
reward functions (mlxft.losses.rl, mlxft.rewards), on the shared run driver and one copy of the weights.
Reads top to bottom: setup -> model -> data -> policy -> optimizer -> rollouts and step -> loop -> save.

    mlxft rl --recipe grpo                                        # built-in model, bundled arithmetic questions
    mlxft rl --recipe grpo --model HuggingFaceTB/SmolLM2-135M-Instruct
    mlxft rl --recipe grpo --set rl.algo=rloo --set "rl.reward_functions=[my_rewards.py:brevity]" --data prompts.jsonl
    mlxft rl --recipe grpo --set rl.algo=ppo --set rl.num_iterations=4 --set rl.reward_adapter=runs/reward-.../best
    mlxft rl --recipe grpo --backend torch

The policy is the base + the adapter being trained; the reference is the same model with the
adapter switched off (lora.adapter_off, as DPO's), without gradient; a reward model (rl.reward_adapter, from `mlxft reward`) is the same model again with
its adapter swapped into the LoRA layers for the scoring forward (lora.adapter_swapped) and its
head beside it: one copy of the base weights for all three. Each prompt's G completions are sampled together
from one run of the prompt (its KV cache copied to G rows).

Supports: GRPO with group-normalised advantages (or Dr. GRPO's unscaled ones, rl.scale_rewards),
RLOO's leave-one-out advantages, PPO's per-token GAE advantages from a value head (model.value_head,
float32, on the policy's last hidden states: one forward gives log-probs and values; trained in full
beside the adapter, kept in the checkpoint's heads.safetensors, not in the adapter a user loads);
rl.num_iterations updates per rollout batch against π_old from a forward without gradients;
rl.completions_per_pass rows per forward and backward (each pass evaluated before the next, so
only one pass's activations are alive; the gradient is the same);
grpo / dr_grpo / dapo token averaging; the clipped ratio with DAPO's clip-higher (rl.epsilon_high);
KL to the reference (rl.beta, 0 skips its forward; for PPO a penalty in the reward);
weighted reward functions in TRL's signature; LoRA (QLoRA on quantized bases); AdamW with warmup
and decay; gradient accumulation over micro-batches of prompts; clipping; held-out reward of
greedy completions every eval.every steps with the best adapter kept and early stopping;
atomic checkpoints and --resume (the same samples: sampling is seeded by the step);
metrics.jsonl with TRL's names (reward, reward_std, rewards/<function>/mean, kl, clip_ratio,
entropy, completions/mean_length); completions.jsonl every rl.log_completions_every steps.

Raises UserError for bad recipes, data, reward functions (and what they return), models and
adapters; NotImplementedYet for full fine-tuning, for a continued adapter with rl.beta > 0 (its
reference would be that adapter, which cannot be switched off), for several ranks, and for PPO on
a model family whose LM head mlxft does not split off (no hidden states for the value head);
UserError for --quantize on PyTorch without CUDA and for resuming a run another backend wrote.
"""

from __future__ import annotations

from mlxft.backends import engine_for
from mlxft.config import RunConfig
from mlxft.errors import NotImplementedYet
from mlxft.losses.rl import statistic_names, summarizer
from mlxft.methods.rollouts import (
    REWARD_MODEL,
    CompletionLog,
    Rollouts,
    advantages_of,
    encode_prompts,
    iterate_prompt_batches,
    load_rl_data,
    reward_names,
    stop_ids,
)
from mlxft.models.files import pad_id as pad_id_of
from mlxft.models.heads import value_head_init
from mlxft.train import driver
from mlxft.train.distributed import World
from mlxft.train.policy import build_policy, describe_policy
from mlxft.train.runs import Run


def train(config: RunConfig, run: Run, *, backend: str = "mlx", resume: bool = False, adapter: str | None = None,
          echo=print, world: World = World()) -> dict:
    """Train as `config` says on `backend` ('mlx' or 'torch'), writing into `run`; returns the
    summary (also in summary.json)."""
    tc, rc = config.train, config.rl
    engine = engine_for(backend)

    # --- setup ---------------------------------------------------------------------------------
    engine.start(tc.seed)
    splits, functions = load_rl_data(config, adapter, world)  # rows and reward functions first: a mistake should not wait for a model

    # --- model and data --------------------------------------------------------------------------
    model, tokenizer, folder = engine.load(config.model)
    split_head = engine.can_split_head(model, folder)
    pad_id, stop = pad_id_of(tokenizer), stop_ids(tokenizer)
    train_set, valid_set, truncated = encode_prompts(splits, tokenizer, config, echo)

    # --- policy ----------------------------------------------------------------------------------
    spec = build_policy(engine, model, config, folder, start_from=run.checkpoint_dir / "weights" if resume else adapter)
    ppo = rc.algo == "ppo"
    if ppo:  # trained in full beside the adapter, on the policy's own hidden states
        check_ppo(split_head)
        engine.add_value_head(model, value_head_init(engine.hidden_size(model), tc.seed))
    trainable, line = describe_policy(engine, model, folder, spec, config, where=engine.where)
    echo(describe_rl(line, rc, functions))
    echo(f"run folder: {run.folder}")

    # --- optimizer, rollouts and step ------------------------------------------------------------
    optimizer = engine.optimizer(model, tc)
    start = engine.resume(run, model, optimizer, config) if resume else driver.Start()  # before the step is built
    names = reward_names(functions, rc)
    log = CompletionLog(run.folder / "completions.jsonl", rc.log_completions_every, names)
    if resume:
        log.truncate(start.step)
    rollouts = Rollouts(
        sample=lambda prompt_ids, n: engine.sample_completions(model, prompt_ids, n, max_tokens=rc.max_completion_length,
                                                               temperature=rc.temperature, top_p=rc.top_p, stop=stop),
        greedy=lambda prompt_ids: engine.sample_completions(model, prompt_ids, 1, max_tokens=rc.max_completion_length,
                                                            temperature=0.0, stop=stop)[0],
        tokenizer=tokenizer, splits=splits, valid_set=valid_set, functions=functions, rc=rc, pad_id=pad_id,
        pad_multiple=engine.pad_multiple, stop=stop,
        reward_model=engine.swapped_scorer(model, rc.reward_adapter, pad_id) if rc.reward_adapter else None, log=log)
    step = engine.rl_step(model, optimizer, config, split_head=split_head, rollouts=rollouts, advantages=advantages_of,
                          statistics=len(statistic_names(names)), world=world)
    trainer = driver.Trainer(
        step=rollouts.counting(step.step),
        validate=rollouts.validate,
        summarize=summarizer(names, ppo),
        save_weights=lambda where: engine.save_weights(where, model, spec, config, folder),
        save_checkpoint=lambda *state: engine.save_checkpoint(run, model, optimizer, spec, config, folder, *state),
        memory=engine.memory_meter(),
        waits_for_signal=True,
    )

    # --- loop ----------------------------------------------------------------------------------
    model.train()
    fitted = driver.fit(run, config, trainer, train_set, start=start, iterate=iterate_prompt_batches, pad_id=pad_id,
                        pad_multiple=engine.pad_multiple, echo=echo, world=world)

    # --- save ----------------------------------------------------------------------------------
    return driver.summarize_run(
        run, config, fitted, trainer, method="rl", backend=engine.name, device=engine.device, model=str(folder),
        trainable=trainable, setup={"algo": rc.algo, "loss_type": rc.loss_type, "beta": rc.beta,
                                    "num_generations": rc.num_generations, "num_iterations": rc.num_iterations,
                                    "reward_functions": list(rc.reward_functions)},
        data={"train_prompts": len(train_set), "valid_prompts": len(valid_set), "truncated_prompts": truncated},
        outputs={"completions": str(log.path) if log.path.exists() else None})


def check_ppo(split_head: bool) -> None:
    if not split_head:
        raise NotImplementedYet("rl.algo=ppo reads the value head off the model's last hidden states, which mlxft "
                                "takes only from the model families it can split at the LM head (Llama, Qwen, "
                                "Mistral, ...); use rl.algo=grpo or rloo with this model")


def describe_rl(policy_line: str, rc, functions) -> str:
    names = reward_names(functions, rc)
    if rc.reward_adapter:
        names[-1] = f"{REWARD_MODEL} ({rc.reward_adapter}, on this model's weights)"
    return (f"{policy_line}; {rc.algo.upper()} ({rc.loss_type} loss), {rc.num_generations} completions per prompt of "
            f"at most {rc.max_completion_length} tokens, beta {rc.beta:g}; rewards: {', '.join(names)}")
