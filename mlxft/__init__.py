"""mlxft: fine-tune language models on the machine in front of you (MLX first, PyTorch too)."""

__version__ = "0.1.0"
