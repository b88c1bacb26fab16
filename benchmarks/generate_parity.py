"""Greedy answers and tokens/s of `mlxft generate` on both backends, on a real model.

    python tests/real/fetch.py                          # SmolLM2-135M-Instruct, once
    python benchmarks/generate_parity.py                # ~/.cache/mlxft-real/SmolLM2-135M-Instruct, 1 thread a side
    python benchmarks/generate_parity.py --model builtin --max-tokens 128

Each prompt goes through the model's chat template (mlxft.conversation, as `mlxft generate` renders
it) and is answered greedily by each side's TextGenerator: MLX (mlx-lm's stream_generate), PyTorch
(mlxft's own decode loop over transformers' KV cache), and as a reference for the PyTorch loop,
transformers' model.generate with a TextIteratorStreamer on a second thread (the other way to
stream on PyTorch). Every side runs in a process of its own with the same thread count (MLX with
the BLAS preload the `mlxft` command uses). Tokens/s is answer tokens over the wall time of the
whole answer, prompt included, after one untimed warm-up answer. Prints a table and whether the
answers are equal token for token; the figures go to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPTS = ["What is the capital of France?", "Give three tips for staying healthy.",
           "Write a haiku about the sea."]
DEFAULT_MODEL = Path("~/.cache/mlxft-real/SmolLM2-135M-Instruct").expanduser()


def answer_all(side: str, model: str, max_tokens: int) -> list[dict]:
    """Runs inside the side's process: [{prompt, text, tokens, seconds}] per prompt."""
    from mlxft.conversation import Conversation, resolve_template
    from mlxft.generation import Sampling

    if side == "mlx":
        from mlxft.backends.mlx.stream import load_generator
    else:
        from mlxft.backends.torch.stream import load_generator
    generator = load_generator(model)
    conversation = Conversation(resolve_template("auto", generator.tokenizer), generator.tokenizer, None)
    sampling = Sampling(max_tokens=max_tokens)
    results = []
    for i, prompt in enumerate([PROMPTS[0], *PROMPTS]):  # the first answer warms up, untimed
        ids = generator.encode(conversation.prompt(prompt, ""))
        start = time.perf_counter()
        if side == "transformers":
            text, used = transformers_answer(generator, ids, max_tokens)
        else:
            pieces = list(generator.stream(ids, sampling))
            text, used = "".join(p.text for p in pieces), pieces[-1].completion_tokens
        seconds = time.perf_counter() - start
        if i > 0:
            results.append({"prompt": prompt, "text": text, "tokens": used, "seconds": seconds})
    return results


def transformers_answer(generator, ids: list[int], max_tokens: int) -> tuple[str, int]:
    """model.generate (greedy) streamed through TextIteratorStreamer, as transformers' docs show it."""
    import threading

    import torch
    from transformers import TextIteratorStreamer

    model = generator.model
    streamer = TextIteratorStreamer(generator.tokenizer, skip_prompt=True)
    inputs = torch.tensor([ids], device=next(model.parameters()).device)
    counted = {}

    def run():
        output = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=max_tokens, do_sample=False,
                                eos_token_id=sorted(generator.end_ids), pad_token_id=generator.tokenizer.eos_token_id,
                                streamer=streamer)
        answer = output[0, len(ids):].tolist()
        counted["tokens"] = len(answer) - (answer[-1] in generator.end_ids)

    thread = threading.Thread(target=run)
    thread.start()
    text = "".join(streamer)
    thread.join()
    for end in generator.end_ids:
        text = text.replace(generator.tokenizer.decode([end]), "")
    return text, counted["tokens"]


def side_environment(side: str, threads: int) -> dict:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": str(ROOT), "TRANSFORMERS_VERBOSITY": "error"}
    if side == "mlx":
        from mlxft.blas import ensure_shim

        shim, why = ensure_shim()
        if shim is not None:
            env["LD_PRELOAD"] = str(shim)
        else:
            print(f"note: MLX runs on the stock BLAS ({why})", file=sys.stderr)
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sides", default="mlx,torch,transformers")
    parser.add_argument("--side", default=None, help=argparse.SUPPRESS)  # inside a side's process
    args = parser.parse_args()
    if args.side:
        if args.side != "mlx":
            import torch

            torch.set_num_threads(args.threads)
        print(json.dumps(answer_all(args.side, args.model, args.max_tokens)))
        return
    results = {}
    for side in args.sides.split(","):
        command = [sys.executable, __file__, "--side", side, "--model", args.model, "--max-tokens", str(args.max_tokens),
                   "--threads", str(args.threads)]
        done = subprocess.run(command, env=side_environment(side, args.threads), capture_output=True, text=True, check=True)
        results[side] = json.loads(done.stdout.strip().splitlines()[-1])
    sides = list(results)
    print(f"model {args.model}, greedy, max {args.max_tokens} tokens, {args.threads} thread(s) a side")
    print("| side | answer tokens | tokens/s |")
    print("|---|---|---|")
    for side in sides:
        tokens = sum(r["tokens"] for r in results[side])
        seconds = sum(r["seconds"] for r in results[side])
        print(f"| {side} | {tokens} | {tokens / seconds:.1f} |")
    for i, prompt in enumerate(PROMPTS):
        texts = {side: results[side][i]["text"] for side in sides}
        same = len(set(texts.values())) == 1
        print(f"\n{prompt!r}: {'equal on ' + ', '.join(sides) if same else 'DIFFERENT'}")
        for side in sides if not same else sides[:1]:
            print(f"  {side}: {texts[side]!r}")


if __name__ == "__main__":
    main()
