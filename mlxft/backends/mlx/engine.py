"""The MLX engine (mlxft.backends.engine): mlx-lm's models, mlxft's LoRA layers, MLX's AdamW and
compiled steps, on Metal or MLX's CPU backend.

MLX's rules, kept here so that no method needs to know them:
- the optimizer state is restored before a step is compiled: the compiled step captures it
  (so a method calls `resume` before asking for its step);
- the reference (adapter off) is its own compiled function, traced with the adapter's layers
  switched off, and evaluated before the policy's forward begins, so that its activations are
  freed first;
- the pieces of one RL rollout that need no gradient are evaluated pass by pass.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from mlxft.backends.engine import MethodStep
from mlxft.backends.mlx import PAD_MULTIPLE, checkpoint, lora, steps
from mlxft.backends.mlx import model as mlx_model
from mlxft.backends.mlx.evaluate import evaluate
from mlxft.backends.mlx.fuse import fuse
from mlxft.backends.mlx.generate import generate_answer, sample_completions
from mlxft.backends.mlx.stream import load_generator
from mlxft.data.passes import row_passes, split_passes
from mlxft.errors import NotImplementedYet
from mlxft.losses.dpo import needs_reference, statistic_names
from mlxft.losses.reward import STATISTICS
from mlxft.models.files import SPLIT_HEAD_TYPES
from mlxft.models.heads import HEAD, TASK_TYPE, saved_head, score_positions
from mlxft.train.distributed import World, check_fsdp
from mlxft.train.driver import Start


class MLXEngine:
    name = "mlx"
    pad_multiple = PAD_MULTIPLE
    lora = lora
    model = mlx_model
    where = ""  # the device is MLX's default: the policy line need not say
    sharded = False  # MLX's ranks each hold the whole model
    evaluate = staticmethod(evaluate)
    generate_answer = staticmethod(generate_answer)
    sample_completions = staticmethod(sample_completions)
    load_generator = staticmethod(load_generator)  # generate, chat, serve: a model (+ adapter) ready to answer
    fuse = staticmethod(fuse)  # mlxft fuse: an adapter merged into its base, checked

    # --- setup and model ---------------------------------------------------------------------

    def start(self, seed: int) -> None:
        mx.random.seed(seed)
        mlx_model.configure_memory()

    def seed(self, seed: int) -> None:
        mx.random.seed(seed)

    @property
    def device(self) -> str:
        return str(mx.default_device())

    def load(self, model):
        return mlx_model.load(model.name, quantize=model.quantize, trust_remote_code=model.trust_remote_code)

    def can_split_head(self, model, folder: Path) -> bool:
        return mlx_model.can_split_head(model, folder)

    def can_pack(self, model, folder: Path) -> bool:
        return mlx_model.can_pack(model, folder)

    def can_share_prompts(self, model, folder: Path, train) -> bool:
        # Not with gradient checkpointing: mlx-lm's recomputes each block during the backward pass,
        # after the forward has put back the rotary embeddings the shared layout swaps for its length.
        return mlx_model.can_share_prompts(model, folder) and not train.grad_checkpoint

    def hidden_size(self, model) -> int:
        return model.args.hidden_size

    def add_reward_head(self, model, weight: np.ndarray) -> None:
        setattr(model, HEAD, nn.Linear(weight.shape[1], 1, bias=False))  # trainable: build_policy froze the rest
        getattr(model, HEAD).weight = mx.array(weight)

    def add_value_head(self, model, weight: np.ndarray) -> None:
        model.value_head = nn.Linear(weight.shape[1], 1)
        model.value_head.update({"weight": mx.array(weight), "bias": mx.zeros((1,))})

    def distribute(self, model, config, world: World = World()) -> None:
        check_fsdp(config, "sft", self.name)  # refuses train.fsdp: data parallelism needs nothing here

    def shards(self, model, optimizer) -> dict:
        return {}

    # --- optimizer and checkpoints -----------------------------------------------------------

    def optimizer(self, model, train):
        return optim.AdamW(learning_rate=train.learning_rate, weight_decay=train.weight_decay,
                           bias_correction=train.bias_correction)

    def resume(self, run, model, optimizer, config) -> Start:
        start = Start(*checkpoint.load(run, model, optimizer, config.lora.full_finetune))
        if hasattr(model, "value_head"):
            model.value_head.update(tree_unflatten(list(checkpoint.load_heads(run).items()))["value_head"])
        return start

    def save_weights(self, folder: Path, model, spec, config, base_folder) -> None:
        checkpoint.save_weights(folder, model, spec, config, base_folder)

    def save_checkpoint(self, run, model, optimizer, spec, config, base_folder, step, best, stale, progress=None) -> None:
        heads = dict(tree_flatten({"value_head": model.value_head.parameters()})) if hasattr(model, "value_head") else None
        checkpoint.save(run, model, optimizer, spec, config, base_folder, step, best, stale, progress, heads=heads)

    def memory_meter(self):
        return mlx_model.memory_meter()

    # --- the methods' steps ------------------------------------------------------------------

    def _step(self, model, optimizer, loss, inputs_of, train, world, statistics: int = 2, **kwargs) -> tuple:
        micro_step, update = steps.make_step(model, optimizer, loss, train.max_grad_norm)
        step = steps.train_step(model, optimizer, micro_step, update, inputs_of, train.seed, world, statistics, **kwargs)
        return step, micro_step

    def sft_step(self, model, optimizer, config, *, split_head: bool, world: World = World()) -> MethodStep:
        tc = config.train
        if config.data.packing:
            loss, inputs_of = partial(steps.packed_sft_loss, chunk=tc.head_chunk), steps.packed_sft_inputs
        else:
            loss, inputs_of = partial(steps.sft_loss, split_head=split_head, chunk=tc.head_chunk), steps.sft_inputs
        step, micro_step = self._step(model, optimizer, loss, inputs_of, tc, world)
        return MethodStep(step, trace=lambda batch: micro_step(*inputs_of(batch)))

    def reward_step(self, model, optimizer, config, *, pad_id: int, world: World = World()) -> MethodStep:
        loss = partial(steps.reward_loss, center_coefficient=config.reward.center_coefficient)

        def inputs_of(pairs) -> tuple:
            return steps.reward_inputs(pairs, pad_id)

        def validation_sums(pairs, rows) -> np.ndarray:
            return np.array(loss(model, *inputs_of(pairs))[1])

        step, micro_step = self._step(model, optimizer, loss, inputs_of, config.train, world, len(STATISTICS))
        return MethodStep(step, validation_sums, trace=lambda pairs: micro_step(*inputs_of(pairs)))

    def pair_step(self, model, optimizer, config, *, split_head: bool, shared: bool, pad_id: int, reference=None,
                  labels=None, world: World = World(), pad_to_multiple: int | None = None) -> MethodStep:
        """`reference(pairs, split, rows)`: cached reference log-prob sums [2B] (numpy), or None for
        the base model's, computed each step with the adapter off; `labels`: KTO's per split."""
        tc, dc = config.train, config.dpo
        loss = partial(steps.pair_loss, split_head=split_head, dc=dc, chunk=tc.head_chunk)
        live_reference = (steps.make_reference_step(model, split_head, tc.head_chunk)
                          if reference is None and needs_reference(dc.loss_type) else None)

        def arrays_of(pairs) -> dict:
            return steps.pair_arrays(pairs.batch, pad_id, shared, pad_to_multiple)

        def reference_for(pairs, split: str, arrays, rows=None):
            if reference is not None:
                return mx.array(reference(pairs, split, rows))
            if live_reference is None:  # a loss without a reference: never read
                return mx.zeros((2 * pairs.pairs,), mx.float32)
            return live_reference(arrays)

        def labels_of(pairs, split: str, rows=None) -> tuple:
            """KTO's labels of the batch's pairs, as a step input (none without labels: the bench)."""
            index = pairs.index if rows is None else rows[pairs.index]
            return () if labels is None else (mx.array(labels[split][index]),)

        def inputs_of(pairs) -> tuple:
            arrays = arrays_of(pairs)
            before = reference_for(pairs, "train", arrays)
            mx.eval(before)  # the reference forward's activations are freed before the policy's begins
            return arrays, before, *labels_of(pairs, "train")

        def validation_sums(pairs, rows) -> np.ndarray:
            arrays = arrays_of(pairs)
            return np.array(steps.pair_loss(model, arrays, reference_for(pairs, "valid", arrays, rows),
                                            *labels_of(pairs, "valid", rows), split_head=split_head, dc=dc)[1])

        def trace(pairs) -> None:
            arrays = arrays_of(pairs)
            if live_reference is not None:
                live_reference(arrays)
            micro_step(arrays, mx.zeros((arrays["weights"].shape[0],), mx.float32), *labels_of(pairs, "train"))

        step, micro_step = self._step(model, optimizer, loss, inputs_of, tc, world, len(statistic_names(dc.loss_type)))
        return MethodStep(step, validation_sums, trace)

    def score_pairs(self, model, pairs, *, pad_id: int, split_head: bool, shared: bool, batch_size: int):
        return steps.score_pairs(model, pairs, lambda batch: steps.pair_arrays(batch.batch, pad_id, shared), pad_id,
                                 split_head, batch_size)

    def rl_step(self, model, optimizer, config, *, split_head: bool, rollouts, advantages, statistics: int,
                world: World = World()) -> MethodStep:
        """`rollouts.make(prompt batch)` samples and scores a rollout; `advantages(rollout, old
        log-probs, reference log-probs, old values, weights, rl config)` -> (advantages, returns);
        `statistics`: how many sums the step reports (mlxft.losses.rl.statistic_names)."""
        tc, rc = config.train, config.rl
        ppo = rc.algo == "ppo"
        loss = partial(steps.rl_loss, split_head=split_head, rc=rc, chunk=tc.head_chunk)
        reference_step = steps.make_token_reference_step(model, split_head, tc.head_chunk) if rc.beta else None
        old_policy_step = (steps.make_old_policy_step(model, split_head, ppo, tc.head_chunk)
                           if ppo or rc.num_iterations > 1 else None)

        def without_gradients(passes, inputs, positions, tokens) -> tuple:
            """The reference's log-probs, π_old's and its values, pass by pass (zeros where not needed)."""
            reference, old_logps, old_values = [], [], []
            for rows in passes:
                one = (inputs[rows], positions[rows], tokens[rows])
                reference.append(reference_step(*one) if reference_step else mx.zeros(one[2].shape))
                old = old_policy_step(*one) if old_policy_step else (mx.zeros(one[2].shape),) * 2
                old_logps.append(old[0])
                old_values.append(old[1])
                mx.eval(reference[-1], *old)  # each pass's activations are freed before the next begins
            return tuple(mx.concatenate(parts) for parts in (reference, old_logps, old_values))

        def passes_of(batch) -> list[tuple]:
            rollout = rollouts.make(batch)
            inputs, positions, tokens, weights = steps.sft_inputs(rollout.batch)
            passes = row_passes(len(inputs), rc.completions_per_pass)
            reference, old_logps, old_values = without_gradients(passes, inputs, positions, tokens)
            advantage, returns = advantages(rollout, *map(np.array, (old_logps, reference, old_values, weights)), rc)
            carried = mx.array(rollout.carried)
            return split_passes((inputs, positions, tokens, weights, reference, old_logps, old_values, mx.array(advantage),
                                 mx.array(returns)), carried, mx.zeros_like(carried), passes)

        def trace(batch) -> None:
            for inputs in passes_of(batch):
                micro_step(*inputs)

        step, micro_step = self._step(model, optimizer, loss, None, tc, world, statistics, updates=rc.num_iterations,
                                      passes_of=passes_of)
        return MethodStep(step, trace=trace)

    # --- scores of a reward model ------------------------------------------------------------

    def swapped_scorer(self, model, adapter: str, pad_id: int):
        """score(input_ids [N, T]) -> scores [N] (numpy) of a reward adapter (mlxft reward, trained on
        this model's base) run on the model being trained: its LoRA weights swapped in for the forward
        (lora.adapter_swapped) and its head kept outside the model, so that nothing of it trains.
        One copy of the base weights serves the policy, the reference and the reward model."""
        from mlxft.models.adapters import load_adapter

        spec, weights = load_adapter(adapter, task_type=TASK_TYPE)
        head = head_of(adapter, model.args.hidden_size)

        def score(input_ids: np.ndarray) -> np.ndarray:
            with lora.adapter_swapped(model, weights, spec.scaling):
                return np.array(steps.reward_scores(model, mx.array(input_ids),
                                                    mx.array(score_positions(input_ids, pad_id)), head))

        return score

    def load_scorer(self, name: str, adapter: str, *, trust_remote_code: bool = False):
        """(tokenizer, score): a saved reward adapter on its base model, and a function from rows of
        token ids [N, T] (right-padded with the tokenizer's pad id) to their scores [N] (numpy)."""
        from mlxft.models.adapters import attach_adapter
        from mlxft.models.files import pad_id as pad_id_of

        model, tokenizer, folder = mlx_model.load(name, trust_remote_code=trust_remote_code)
        if not mlx_model.can_split_head(model, folder):
            raise NotImplementedYet(f"model {folder}: reward models run on the families {', '.join(sorted(SPLIT_HEAD_TYPES))} for now")
        attach_adapter(lora, model, adapter, task_type=TASK_TYPE)
        head = head_of(adapter, model.args.hidden_size)
        model.eval()
        pad_id = pad_id_of(tokenizer)

        def score(input_ids: np.ndarray) -> np.ndarray:
            return np.array(steps.reward_scores(model, mx.array(input_ids), mx.array(score_positions(input_ids, pad_id)),
                                                head))

        return tokenizer, score


def head_of(adapter: str, hidden_size: int) -> nn.Linear:
    """The reward head saved beside an adapter, as a layer outside the model (nothing trains it)."""
    head = nn.Linear(hidden_size, 1, bias=False)
    head.weight = mx.array(saved_head(adapter, hidden_size))
    return head
