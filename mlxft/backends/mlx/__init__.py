"""The MLX backend: model loading through mlx-lm, LoRA, the SFT step, evaluation, adapters."""

# Batch widths are rounded up to a multiple of this many tokens. Each new width traces the
# compiled step again (0.1-0.3 s on CPU for the models here, once per width), so a coarse
# multiple keeps the traces few at the price of some padding; see benchmarks/RESULTS.md.
PAD_MULTIPLE = 16

# DPO with shared prompts (mlxft.data.shared_prompt) rounds two widths, the prompt's and the
# answers', each shorter than a whole row: to 16 they would give back most of what sharing saves.
# Measured on the bundled pairs over 3 epochs: 4 -> 0.77 of the unshared tokens in 3-4 shapes,
# 16 -> 0.97, 1 -> 0.73 in 14-26 shapes. Past 64 tokens the step coarsens (few_widths), so long
# and varied pairs do not trace a step for every (prompt, answer) width pair.
SHARED_PROMPT_PAD_MULTIPLE = 4
SHARED_PROMPT_FEW_WIDTHS = True
