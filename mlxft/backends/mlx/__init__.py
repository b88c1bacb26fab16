"""The MLX backend: model loading through mlx-lm, LoRA, the SFT step, evaluation, adapters."""

# Batch widths are rounded up to a multiple of this many tokens. Each new width traces the
# compiled step again (0.1-0.3 s on CPU for the models here, once per width), so a coarse
# multiple keeps the traces few at the price of some padding; see benchmarks/RESULTS.md.
PAD_MULTIPLE = 16
