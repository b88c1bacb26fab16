"""The `mlxft` command: a click group whose sub-commands are thin shells over library calls,
one module per group of commands.

    common.py    the group, one-line errors, the options every command shares
    data.py      data convert mind|pairs, data split, data inspect
    train.py     lora, dpo, sweep
    evaluate.py  eval auc|rank|generate|judge, plot
    models.py    fuse, export gguf, generate, chat, serve
    tools.py     recipes, doctor, bench
"""

from __future__ import annotations

import sys

from mlxft.cli import data, evaluate, models, tools, train  # noqa: F401  (each registers its commands)
from mlxft.cli.common import cli

__all__ = ["cli", "main"]


def main():
    from mlxft.blas import reexec_with_fast_blas

    reexec_with_fast_blas(sys.argv[1:])  # Linux: MLX's CPU products through OpenBLAS (see mlxft.blas)
    cli(prog_name="mlxft")
