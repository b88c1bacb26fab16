"""The PyTorch engine (mlxft.backends.engine): transformers' models, LoRA through PEFT's layout,
MLX's AdamW update (adamw.py), on CUDA, MPS or the CPU.

PyTorch's rules, kept here so that no method needs to know them: the forward runs under bf16
autocast on CUDA (weights and optimizer state stay float32); the reference and π_old run under
torch.no_grad(), so none of their activations are kept; nothing is compiled, so a new batch width
costs nothing and batches are padded to their longest row.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mlxft.backends.engine import MethodStep
from mlxft.backends.torch import PAD_MULTIPLE, checkpoint, lora, steps
from mlxft.backends.torch import model as torch_model
from mlxft.backends.torch.adamw import MLXAdamW
from mlxft.backends.torch.evaluate import evaluate
from mlxft.backends.torch.fuse import fuse
from mlxft.backends.torch.generate import generate_answer, sample_completions
from mlxft.backends.torch.stream import load_generator
from mlxft.data.batching import scored_targets
from mlxft.data.passes import row_passes, split_passes
from mlxft.errors import NotImplementedYet
from mlxft.losses.dpo import needs_reference, statistic_names
from mlxft.losses.reward import STATISTICS
from mlxft.models.files import SPLIT_HEAD_TYPES
from mlxft.models.heads import HEAD, TASK_TYPE, saved_head, score_positions
from mlxft.train.distributed import World, check_fsdp
from mlxft.train.driver import Start


class TorchEngine:
    name = "torch"
    pad_multiple = PAD_MULTIPLE
    lora = lora
    model = torch_model
    generate_answer = staticmethod(generate_answer)
    sample_completions = staticmethod(sample_completions)
    load_generator = staticmethod(load_generator)  # generate, chat, serve: a model (+ adapter) ready to answer
    fuse = staticmethod(fuse)  # mlxft fuse: an adapter merged into its base, checked

    def __init__(self):
        self.torch_device = torch_model.pick_device()
        self.adapter_seed = None
        self.sharded = False

    # --- setup and model ---------------------------------------------------------------------

    def start(self, seed: int) -> None:
        self.adapter_seed = seed  # seeded after loading: a new adapter is then a function of the seed alone

    def seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    @property
    def device(self) -> str:
        return str(self.torch_device)

    @property
    def where(self) -> str:
        return f" on {self.torch_device}"

    def load(self, model):
        loaded = torch_model.load(model.name, quantize=model.quantize, trust_remote_code=model.trust_remote_code,
                                  device=self.torch_device)
        if self.adapter_seed is not None:
            torch.manual_seed(self.adapter_seed)
        return loaded

    def can_split_head(self, model, folder: Path) -> bool:
        return torch_model.can_split_head(model, folder)

    def can_pack(self, model, folder: Path) -> bool:
        return torch_model.can_pack(model, folder)

    def can_share_prompts(self, model, folder: Path, train) -> bool:
        return torch_model.can_share_prompts(model, folder)

    def hidden_size(self, model) -> int:
        return model.config.hidden_size

    def add_reward_head(self, model, weight: np.ndarray) -> None:
        setattr(model, HEAD, torch.nn.Linear(weight.shape[1], 1, bias=False, device=self.torch_device, dtype=torch.float32))
        with torch.no_grad():
            getattr(model, HEAD).weight.copy_(torch.from_numpy(weight))

    def add_value_head(self, model, weight: np.ndarray) -> None:
        model.value_head = torch.nn.Linear(weight.shape[1], 1, device=self.torch_device, dtype=torch.float32)
        with torch.no_grad():
            model.value_head.weight.copy_(torch.from_numpy(weight))
            model.value_head.bias.zero_()

    def distribute(self, model, config, world: World = World()) -> None:
        """train.fsdp: each decoder layer's weights, and then the rest, split across the ranks
        (FSDP2's fully_shard), and with them their gradients and AdamW's moments. A layer's weights
        are gathered for its forward and backward and freed after; the gradients are averaged
        across ranks in the backward pass (FSDP's reduce-scatter; gloo has no pre-scaled sum), which
        the step undoes by dividing by the global count over the ranks (steps.train_step)."""
        check_fsdp(config, "sft", self.name)
        if not config.train.fsdp or world.size < 2:  # one rank holds it all: a sharded run resumed in one process
            return
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        self.sharded = True

    def as_forward(self, model, name: str, fn):
        """`fn` run as a forward of the sharded model's root (FSDP2's register_fsdp_forward_method).
        mlxft runs the model's body and head as functions of it, not through its forward, so
        FSDP would otherwise neither gather the root's own weights (embeddings, final norm, head)
        before them nor reduce their gradients after. Unsharded, `fn` itself."""
        if not self.sharded:
            return fn
        if not hasattr(model, name):  # registered once: validation asks for it at every evaluation
            import types

            from torch.distributed.fsdp import register_fsdp_forward_method

            setattr(model, name, types.MethodType(lambda _, *args, **kwargs: fn(*args, **kwargs), model))
            register_fsdp_forward_method(model, name)
        return getattr(model, name)

    def shards(self, model, optimizer) -> dict:
        """What this rank holds of the sharded weights and AdamW's moments (numbers of values)."""
        if not self.sharded:
            return {}
        local = lambda t: t.to_local().numel() if hasattr(t, "to_local") else t.numel()  # noqa: E731
        moments = sum(local(v) for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))
        return {"parameters": sum(p.numel() for p in model.parameters()),
                "parameters_on_this_rank": sum(local(p) for p in model.parameters()),
                "optimizer_state_on_this_rank": moments}

    # --- optimizer and checkpoints -----------------------------------------------------------

    def optimizer(self, model, train):
        named = {name: p for name, p in model.named_parameters() if p.requires_grad}
        return MLXAdamW(named, lr=train.learning_rate, weight_decay=train.weight_decay,
                        bias_correction=train.bias_correction)

    def resume(self, run, model, optimizer, config) -> Start:
        start = Start(*checkpoint.load(run, model, optimizer, optimizer.named, config.lora.full_finetune,
                                       config.model.trust_remote_code))
        if hasattr(model, "value_head"):
            heads = checkpoint.load_heads(run, self.torch_device)
            model.value_head.load_state_dict({k.removeprefix("value_head."): v for k, v in heads.items()})
        return start

    def save_weights(self, folder: Path, model, spec, config, base_folder) -> None:
        checkpoint.save_weights(folder, model, spec, config, base_folder)

    def save_checkpoint(self, run, model, optimizer, spec, config, base_folder, step, best, stale, progress=None) -> None:
        heads = ({f"value_head.{k}": v for k, v in model.value_head.state_dict().items()}
                 if hasattr(model, "value_head") else None)
        checkpoint.save(run, model, optimizer, optimizer.named, spec, config, base_folder, step, best, stale, progress,
                        heads=heads)

    def memory_meter(self):
        return torch_model.memory_meter(self.torch_device)

    # --- the methods' steps ------------------------------------------------------------------

    def _step(self, optimizer, loss_of, train, world, statistics: int = 2, **kwargs):
        return steps.train_step(optimizer, loss_of, seed=train.seed, max_grad_norm=train.max_grad_norm, world=world,
                                statistics=statistics, names=list(optimizer.named), sharded=self.sharded,
                                **kwargs)

    def sft_step(self, model, optimizer, config, *, split_head: bool, world: World = World()) -> MethodStep:
        chunk, device = config.train.head_chunk, self.torch_device
        if config.data.packing:
            def loss_of(batch):
                return steps.packed_sft_loss(model, batch, device=device, chunk=chunk)
        else:
            def loss_of(batch):
                return steps.sft_loss(model, batch, split_head=split_head, device=device, chunk=chunk)
        return MethodStep(self._step(optimizer, self.as_forward(model, "mlxft_sft_loss", loss_of), config.train, world))

    def reward_step(self, model, optimizer, config, *, pad_id: int, world: World = World()) -> MethodStep:
        def loss_of(pairs):
            return steps.reward_loss(model, pairs, pad_id=pad_id, center_coefficient=config.reward.center_coefficient,
                                     device=self.torch_device)

        @torch.no_grad()
        def validation_sums(pairs, rows) -> np.ndarray:
            return loss_of(pairs)[1].cpu().numpy()

        return MethodStep(self._step(optimizer, loss_of, config.train, world, len(STATISTICS)), validation_sums)

    def pair_step(self, model, optimizer, config, *, split_head: bool, shared: bool, pad_id: int, reference=None,
                  labels=None, world: World = World(), pad_to_multiple: int | None = None) -> MethodStep:
        """`reference(pairs, split, rows)`: cached reference log-prob sums [2B] (numpy), or None for
        the base model's, computed each step with the adapter off; `labels`: KTO's per split."""
        tc, dc, device = config.train, config.dpo, self.torch_device

        def tensors_of(pairs) -> dict:
            return steps.pair_tensors(pairs.batch, pad_id, shared, device, pad_to_multiple)

        def reference_for(pairs, split: str, tensors, rows=None) -> torch.Tensor:
            if reference is not None:
                return torch.from_numpy(reference(pairs, split, rows)).to(device)
            if not needs_reference(dc.loss_type):  # never read
                return torch.zeros(2 * pairs.pairs, device=device)
            with torch_model.autocast(device):  # no_grad: nothing of it is kept for the backward
                return steps.reference_logps(model, tensors, split_head=split_head, chunk=tc.head_chunk)

        def labels_of(pairs, split: str, rows=None):
            index = pairs.index if rows is None else rows[pairs.index]
            return None if labels is None else torch.from_numpy(labels[split][index]).to(device)

        def loss_of(pairs):
            tensors = tensors_of(pairs)
            before = reference_for(pairs, "train", tensors)
            with torch_model.autocast(device):
                return steps.pair_loss(model, tensors, before, labels_of(pairs, "train"), split_head=split_head, dc=dc,
                                       chunk=tc.head_chunk)

        @torch.no_grad()
        def validation_sums(pairs, rows) -> np.ndarray:
            tensors = tensors_of(pairs)
            before = reference_for(pairs, "valid", tensors, rows)
            with torch_model.autocast(device):
                return steps.pair_loss(model, tensors, before, labels_of(pairs, "valid", rows), split_head=split_head,
                                       dc=dc)[1].cpu().numpy()

        return MethodStep(self._step(optimizer, loss_of, tc, world, len(statistic_names(dc.loss_type))), validation_sums)

    def score_pairs(self, model, pairs, *, pad_id: int, split_head: bool, shared: bool, batch_size: int):
        device = self.torch_device
        return steps.score_pairs(model, pairs, lambda batch: steps.pair_tensors(batch.batch, pad_id, shared, device),
                                 pad_id, split_head, batch_size, device)

    def rl_step(self, model, optimizer, config, *, split_head: bool, rollouts, advantages, statistics: int,
                world: World = World()) -> MethodStep:
        """`rollouts.make(prompt batch)` samples and scores a rollout; `advantages(rollout, old
        log-probs, reference log-probs, old values, weights, rl config)` -> (advantages, returns);
        `statistics`: how many sums the step reports (mlxft.losses.rl.statistic_names)."""
        tc, rc, device = config.train, config.rl, self.torch_device
        ppo = rc.algo == "ppo"

        def without_gradients(passes, inputs, positions, tokens) -> tuple:
            """The reference's log-probs, π_old's and its values, pass by pass (zeros where not needed)."""
            reference, old_logps, old_values = [], [], []
            for rows in passes:
                one = (inputs[rows], positions[rows], tokens[rows])
                zeros = torch.zeros(one[2].shape, device=device)
                with torch_model.autocast(device):
                    reference.append(steps.reference_token_logps(model, *one, split_head=split_head, chunk=tc.head_chunk)
                                     if rc.beta else zeros)
                    old = (steps.old_policy_outputs(model, *one, split_head=split_head, ppo=ppo, chunk=tc.head_chunk)
                           if ppo or rc.num_iterations > 1 else (zeros, zeros))
                old_logps.append(old[0])
                old_values.append(old[1])
            return tuple(torch.cat(parts).float() for parts in (reference, old_logps, old_values))

        def passes_of(batch) -> list[tuple]:
            rollout = rollouts.make(batch)
            targets = scored_targets(rollout.batch)
            inputs, positions, tokens, weights = torch_model.to_device(device, rollout.batch.input_ids[:, :-1],
                                                                       targets.positions, targets.tokens, targets.weights)
            passes = row_passes(len(inputs), rc.completions_per_pass)
            reference, old_logps, old_values = without_gradients(passes, inputs, positions, tokens)
            advantage, returns = advantages(rollout, *(t.cpu().numpy() for t in (old_logps, reference, old_values, weights)),
                                            rc)
            advantage, returns, carried = torch_model.to_device(device, advantage, returns, rollout.carried)
            return split_passes((inputs, positions, tokens, weights, reference, old_logps, old_values, advantage, returns),
                                carried, torch.zeros_like(carried), passes)

        def loss_of(inputs: tuple):
            with torch_model.autocast(device):
                return steps.rl_loss(model, *inputs, split_head=split_head, rc=rc, chunk=tc.head_chunk)

        return MethodStep(self._step(optimizer, loss_of, tc, world, statistics, passes_of=passes_of,
                                     updates=rc.num_iterations))

    # --- answers, samples and scores ---------------------------------------------------------

    def evaluate(self, model, examples, *, pad_id: int, split_head: bool, batch_size: int = 32, answer_ids=None,
                 world: World = World()) -> dict:
        # Sharded, every forward gathers each layer from every rank: each rank runs all the rows, in step.
        run = self.as_forward(model, "mlxft_evaluate", evaluate)
        return run(model, examples, pad_id=pad_id, split_head=split_head, batch_size=batch_size, answer_ids=answer_ids,
                   world=World() if self.sharded else world)

    # --- scores of a reward model ------------------------------------------------------------

    def swapped_scorer(self, model, adapter: str, pad_id: int):
        """score(input_ids [N, T]) -> scores [N] (numpy) of a reward adapter (mlxft reward, trained on
        this model's base) run on the model being trained: its LoRA weights swapped in for the forward
        (lora.adapter_swapped) and its head kept outside the model, so that nothing of it trains.
        One copy of the base weights serves the policy, the reference and the reward model."""
        from mlxft.models.adapters import load_adapter

        spec, weights = load_adapter(adapter, task_type=TASK_TYPE)
        device = next(model.parameters()).device
        head = head_of(adapter, model.config.hidden_size, device)

        @torch.no_grad()
        def score(input_ids: np.ndarray) -> np.ndarray:
            ids, positions = torch_model.to_device(device, input_ids, score_positions(input_ids, pad_id))
            with lora.adapter_swapped(model, weights, spec.scaling), torch_model.autocast(device):
                return steps.reward_scores(model, ids, positions, head).float().cpu().numpy()

        return score

    def load_scorer(self, name: str, adapter: str, *, trust_remote_code: bool = False):
        """(tokenizer, score): a saved reward adapter on its base model, and a function from rows of
        token ids [N, T] (right-padded with the tokenizer's pad id) to their scores [N] (numpy)."""
        from mlxft.models.adapters import attach_adapter
        from mlxft.models.files import pad_id as pad_id_of

        device = self.torch_device
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


def head_of(adapter: str, hidden_size: int, device) -> torch.nn.Linear:
    """The reward head saved beside an adapter, as a layer outside the model (nothing trains it)."""
    head = torch.nn.Linear(hidden_size, 1, bias=False, device=device, dtype=torch.float32).requires_grad_(False)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(saved_head(adapter, hidden_size)))
    return head
