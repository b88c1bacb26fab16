"""One decode step of a running batch: mlxft serve's engine against mlx-lm's BatchGenerator (the
batching inside mlx_lm.server), and the matrix products alone, in one process.

    python benchmarks/serve_step.py --model ~/.cache/mlxft-real/SmolLM2-135M-Instruct
    python benchmarks/serve_step.py --rows 8,32 --reps 3       # the built-in model

The HTTP load test (serve_load.py) measures requests/s; this measures what bounds them. Both
engines get the same prompts (serve_load's four, greedy), prefilled at once, then --steps decode
steps each, interleaved over --reps repetitions so that noise from the machine falls on both.
Every token of both engines must agree. The floor is the step's matrix products alone (every
linear layer and the LM head, the rows' activations chained through them, one evaluation): no
attention, normalisation, rotary embedding, cache, or sampling. Whatever a server does around
its model, a decode step cannot cost less than that floor, so

    ceiling = mlx-lm's step / floor

bounds how much faster than mlx_lm.server a server that batches the same rows of the same model,
in the same precision, can decode.

Run it with the environment the servers get (serve_load.py's common.side_environment): one BLAS
thread and mlxft's OpenBLAS shim, which the script preloads itself by re-executing once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from serve_load import PROMPTS  # noqa: E402


def in_server_environment(threads: int) -> None:
    """Re-execute this script under common.side_environment once (LD_PRELOAD must be set at start)."""
    if os.environ.get("MLXFT_SERVE_STEP_CHILD"):
        return
    env = {**common.side_environment(threads), "MLXFT_SERVE_STEP_CHILD": "1"}
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def timed(step, steps: int) -> float:
    """Seconds per call of `step`, from nothing in flight to nothing in flight: both engines keep a
    step queued when they return, so the clock starts and stops on an idle device."""
    import mlx.core as mx

    mx.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    mx.synchronize()
    return (time.perf_counter() - start) / steps


def mlxft_steps(model, tokenizer, prompts: list[list[int]], steps: int) -> tuple[float, list[list[int]]]:
    """Seconds per decode step of mlxft's BatchEngine, and each row's tokens."""
    from mlxft.backends.mlx.serve_batch import batch_engine
    from mlxft.generation import Sampling

    engine = batch_engine(model, tokenizer)
    firsts = engine.start([(ids, Sampling(max_tokens=steps + 1), 0) for ids in prompts])
    # The prompts' first tokens: from the next step when the engine runs a step ahead (as mlx-lm's
    # first step hands them out), else from start() (mlxft before it ran a step ahead).
    tokens = [engine.step() if firsts is None else firsts]
    seconds = timed(lambda: tokens.append(engine.step()), steps)
    return seconds, [list(row) for row in zip(*tokens)]


def mlx_lm_steps(model, prompts: list[list[int]], steps: int) -> tuple[float, list[list[int]]]:
    """The same for mlx-lm's BatchGenerator, every prompt prefilled in one batch first."""
    from mlx_lm.generate import BatchGenerator

    generator = BatchGenerator(model, max_tokens=steps + 1, completion_batch_size=len(prompts),
                               prefill_batch_size=len(prompts), stop_tokens=[])
    uids = generator.insert(prompts)
    tokens = {uid: [] for uid in uids}
    while not all(tokens.values()):  # the prompts' step hands out each row's first token
        for response in generator.next_generated():
            tokens[response.uid].append(response.token)

    def step():
        responses = generator.next_generated()
        assert len(responses) == len(prompts), "a row left mlx-lm's batch early"
        for response in responses:
            tokens[response.uid].append(response.token)

    seconds = timed(step, steps)
    generator.close()
    return seconds, [tokens[uid] for uid in uids]


def product_floor(model, rows: int, reps: int = 5) -> float:
    """Seconds for one decode step's matrix products alone, at `rows` rows."""
    import mlx.core as mx

    inner = model.model
    width = inner.embed_tokens.weight.shape[1]
    h0 = mx.random.normal((rows, 1, width), key=mx.random.key(0)) * 0.1
    mx.eval(h0)

    def products():
        h, outputs = h0, []
        for layer in inner.layers:
            attention, mlp = layer.self_attn, layer.mlp
            outputs += [attention.q_proj(h), attention.k_proj(h), attention.v_proj(h)]
            h = h + attention.o_proj(h)
            h = h + mlp.down_proj(mlp.gate_proj(h) * mlp.up_proj(h))
        head = model.lm_head if hasattr(model, "lm_head") else inner.embed_tokens.as_linear
        outputs.append(head(h))
        mx.eval(*outputs)

    products()
    start = time.perf_counter()
    for _ in range(reps):
        products()
    return (time.perf_counter() - start) / reps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="builtin", help="'builtin' or a model folder (a Llama-shaped model)")
    parser.add_argument("--rows", default="1,8,32", help="batch sizes, comma-separated")
    parser.add_argument("--steps", type=int, default=16, help="timed decode steps per engine and repetition")
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions")
    parser.add_argument("--threads", type=int, default=1, help="BLAS threads (serve_load.py gives each server 1)")
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    in_server_environment(args.threads)

    import mlx.core as mx
    import mlx_lm

    from mlxft.backends.mlx.stream import load_generator
    from mlxft.models.files import resolve_model_dir

    generator = load_generator(str(resolve_model_dir(args.model)))
    encoded = [generator.encode(p) for p in PROMPTS]
    results = {"model": args.model, "mlx": mx.__version__, "mlx_lm": mlx_lm.__version__, "threads": args.threads,
               "steps": args.steps, "reps": args.reps, "rows": []}
    for rows in [int(n) for n in args.rows.split(",")]:
        prompts = [encoded[i % len(encoded)] for i in range(rows)]
        ours, theirs, floors = [], [], []
        for _ in range(args.reps):
            seconds, our_tokens = mlxft_steps(generator.model, generator.tokenizer, prompts, args.steps)
            ours.append(seconds)
            seconds, their_tokens = mlx_lm_steps(generator.model, prompts, args.steps)
            theirs.append(seconds)
            if our_tokens != their_tokens:
                sys.exit(f"{rows} rows: the engines' greedy tokens differ")
            floors.append(product_floor(generator.model, rows))
        floor = min(floors)
        row = {"rows": rows, "mlxft_step_ms": round(1000 * min(ours), 1), "mlx_lm_step_ms": round(1000 * min(theirs), 1),
               "products_ms": round(1000 * floor, 1), "step_ratio": round(min(theirs) / min(ours), 3),
               "ceiling": round(min(theirs) / floor, 2)}
        print(f"{rows:3d} rows: mlxft {row['mlxft_step_ms']} ms a step, mlx-lm {row['mlx_lm_step_ms']} ms "
              f"(x{row['step_ratio']}); products alone {row['products_ms']} ms, so at most x{row['ceiling']} "
              "over mlx-lm at this batch", flush=True)
        results["rows"].append(row)
    print("fastest of the repetitions; tokens equal on both engines")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
