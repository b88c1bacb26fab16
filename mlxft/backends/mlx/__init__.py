"""The MLX backend: model loading through mlx-lm, LoRA, the SFT step, evaluation, adapters."""
