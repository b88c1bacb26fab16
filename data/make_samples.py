"""(Re)write the bundled data samples under data/ from mlxft's synthetic generators.

    python data/make_samples.py                      # the committed files (DEFAULT_SEED)
    python data/make_samples.py --seed 7 --out /tmp/samples

The files are a pure function of the seed; tests/test_synthetic.py checks that the committed
ones equal what this script writes with its defaults, so edit the generator
(mlxft/data/sources/synthetic.py), never the files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing mlxft

from mlxft.data.sources.synthetic import write_samples  # noqa: E402
from mlxft.data.sources.synthetic_mind import DEFAULT_SEED, mind_signal_report  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"default {DEFAULT_SEED}")
    parser.add_argument("--out", type=Path, default=HERE, help="folder to write into (default: data/)")
    args = parser.parse_args(argv)
    for path in write_samples(args.out, seed=args.seed):
        print(f"{path.stat().st_size:>9,d} bytes  {path}")
    report = mind_signal_report(args.out / "mind-sample")
    print("MIND signal: " + ", ".join(
        f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in report.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
