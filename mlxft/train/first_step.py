"""The first steps of a run, checked for training nothing, before the first report.

Five trainers of mlx-lm-lora shipped training nothing (DPO #25, ORPO #67/#68, CPO #70, GRPO #50,
where a compiled step froze the LoRA weights), and their users learned it from flat curves hours
later. So the driver asks the backend's step to probe the first steps of every start (a resumed
run too: the step is compiled again after the optimizer is restored) and stops, in one line that
names the tensors and the likely cause, unless every trainable tensor got a finite, non-zero
gradient and the optimizer's update moved it.

Two steps are probed, not one: with LoRA's zero-initialised B, the gradient of A is exactly zero
at the first step and only the second step can show it reaching A. Online RL steps with no signal
at all (every group's rewards equal, so every advantage is zero) are not counted; the check waits
for a step that has one.

A probe costs reductions over the gradients and a few thousand sampled weights a tensor, once.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlxft.errors import UserError

PROBED_STEPS = 2  # see the module docstring: LoRA's A shows its gradient from the second step on
SAMPLES = 4096  # weights read per tensor, before and after the update, to see that it moved


@dataclass(frozen=True)
class TensorProbe:
    """What one step did to one trainable tensor."""

    name: str
    gradient: float  # the largest |element| of its gradient (summed over the step's micro-batches)
    finite: bool  # every element of that gradient is finite
    changed: bool  # the update moved at least one of its sampled weights (the largest gradient's among them)


class TrainsNothing(UserError):
    """The run's first steps show that it cannot train: stopped before it wastes the run."""


def sample_points(size: int) -> range:
    """Flat indices of the weights a probe reads from a tensor of `size` elements (beside its
    largest gradient's): evenly strided, at most SAMPLES."""
    return range(0, size, max(1, size // SAMPLES))


class FirstStepCheck:
    """Fed each probed step's TensorProbes by the driver; raises TrainsNothing when they show the
    run cannot train, and says once that it passed.

        check = FirstStepCheck(learning_rate=tc.learning_rate, waits_for_signal=is_rl)
        while check.pending: check.observe(step, probes, scored, rate)
    """

    def __init__(self, *, learning_rate: float, waits_for_signal: bool = False, enabled: bool = True):
        self.configured_rate = learning_rate
        self.waits_for_signal = waits_for_signal
        self.pending = enabled
        self.proven: set[str] = set()
        self.counted = 0

    def observe(self, step: int, probes: list[TensorProbe] | None, scored: float, rate: float) -> str | None:
        """Take step `step`'s (1-based) probes, the count its loss is a sum over (`scored`, the
        step's sums[0]) and the learning rate it applied. Returns the line to print when the check
        has passed, else None; raises TrainsNothing when the run cannot train."""
        if probes is None:  # a step that cannot probe (a test's trainer): nothing to check
            self.pending = False
            return None
        if not probes:
            raise TrainsNothing("nothing to train: the model has no trainable tensor (check lora.target_modules and "
                                "lora.layers against the model's module names)")
        if scored == 0:
            raise TrainsNothing(f"step {step} scored nothing: every label in its batch is masked (the answers cut "
                                f"off by data.cutoff, or a template that marks no answer tokens)")
        broken = [p.name for p in probes if not p.finite]
        if broken:
            raise TrainsNothing(f"step {step}: the gradient is not finite in {listed(broken, probes)}: the model "
                                f"overflows (float16 weights or inputs?), or its weights are already not finite")
        if all(p.gradient == 0 for p in probes):
            if self.waits_for_signal:  # no reward differed within any group: no signal, not a fault
                return None
            raise TrainsNothing(f"step {step}: no gradient reached any of the {len(probes)} trainable tensors: the "
                                f"loss does not depend on them (a detached or stop-gradient path, or adapted "
                                f"modules the forward never calls)")
        frozen = [p.name for p in probes if p.gradient > 0 and not p.changed]
        if frozen:
            raise TrainsNothing(f"step {step}: {listed(frozen, probes)} got a gradient but did not change: "
                                + ("the learning rate is 0 (train.learning_rate=0; for a control run that trains "
                                   "nothing on purpose, set train.check_first_step=false)" if rate == 0 else
                                   f"the optimizer's update did not reach them at learning rate {rate:.3g} (a "
                                   f"compiled step that does not carry the weights as its state, or an update "
                                   f"too small for the weights' dtype)"))
        self.proven.update(p.name for p in probes if p.gradient > 0)
        self.counted += 1
        unproven = [p.name for p in probes if p.name not in self.proven]
        if not unproven:
            self.pending = False
            return f"first steps check: all {len(probes)} trainable tensors got a finite gradient and changed"
        if self.counted >= PROBED_STEPS:
            raise TrainsNothing(f"in {self.counted} steps no gradient reached {listed(unproven, probes)}: the loss "
                                f"does not depend on them (a detached or stop-gradient path, or adapted modules the "
                                f"forward never calls)")
        return None


def listed(names: list[str], probes: list) -> str:
    """'3 of 60 trainable tensors (a, b, c)', the first three named."""
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return f"{len(names)} of {len(probes)} trainable tensors ({shown})"
