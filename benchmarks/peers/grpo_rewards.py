"""The reward of benchmarks/grpo_mlx.py, for both sides (TRL's signature, which mlx-lm-lora's
call also fits): a random model never answers a sum, so a reward that differs within a group is
needed for the advantages, and thus the loss, to be the real work."""


def varied(prompts, completions, **kwargs):
    return [(len(completion) % 7) / 7 for completion in completions]
