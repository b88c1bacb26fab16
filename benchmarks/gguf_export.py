"""GGUF exports judged by llama.cpp: each --type of SmolLM2-135M-Instruct (size, export time, what
the certificate says), an adapter on its own, and each architecture as a small random model
(llama.cpp's logits against transformers').

    python tests/real/fetch.py && pip install -e '.[llama-cpp]'
    python benchmarks/gguf_export.py [--types f32,f16,q8_0,q6_k,q5_k_m,q4_k_m,q4_0] [--work DIR]

Each export runs as a user runs it (`mlxft export gguf`, its own process, MLX on mlxft's BLAS
preload); its time includes the certificate, and the write alone is timed in the same process
from the certificate-free path. Prints markdown tables for benchmarks/RESULTS.md and saves
gguf_export.json in the work folder.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "real"))
sys.path.insert(0, str(ROOT / "tests"))


def export_types(model: Path, kinds: list[str], work: Path) -> list[dict]:
    from mlxft.models.gguf.write import write_gguf

    rows = []
    for kind in kinds:
        out = work / kind / "smollm2.gguf"
        out.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        write_gguf(model, work / kind / "write-only.gguf", kind)
        write_seconds = time.perf_counter() - start
        (work / kind / "write-only.gguf").unlink()
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "mlxft.cli", "export", "gguf", str(model), "--out", str(out),
                                 "--type", kind, "--force"], capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if result.returncode != 0:
            rows.append({"type": kind, "error": (result.stderr or result.stdout).strip().splitlines()[-1]})
            continue
        certificate = json.loads((out.parent / "smollm2.certificate.json").read_text())
        greedy = certificate["greedy"]
        rows.append({"type": kind, "mb": out.stat().st_size / 1e6, "write_s": write_seconds, "export_certified_s": seconds,
                     "tokens_ok": not certificate["tokenizer"]["mismatches"], "equal": greedy["equal"], "prompts": greedy["prompts"],
                     "agreement": greedy["token_agreement"], "logits": certificate["logits"]["max_relative_difference"],
                     "passed": certificate["passed"], "france": greedy["answers"][0]["llama_cpp"]})
    return rows


def architectures() -> list[dict]:
    import numpy as np
    import torch
    from test_gguf_llama_cpp import ARCHITECTURES, architecture_model

    from mlxft.models.builtin import tokenizer_dir
    from mlxft.models.gguf.runtime import Runtime
    from mlxft.models.gguf.write import write_gguf

    rows = []
    for model_type in ARCHITECTURES:
        with tempfile.TemporaryDirectory() as work:
            model, folder, vocab = architecture_model(Path(work), tokenizer_dir(), model_type)
            ids = [1, *np.random.default_rng(0).integers(3, vocab, 30).tolist()]
            with torch.no_grad():
                reference = model(torch.tensor([ids])).logits[0].numpy()
            row = {"model_type": model_type}
            for kind in ("f32", "f16"):
                report = write_gguf(folder, Path(work) / f"{kind}.gguf", kind)
                runtime = Runtime(Path(work) / f"{kind}.gguf", context=64)
                row[kind] = float(np.abs(runtime.logits(ids) - reference).max() / np.abs(reference).max())
                runtime.close()
                row["gguf"] = report["architecture"]
            rows.append(row)
    return rows


def main() -> None:
    from fetch import convert

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default="f32,f16,q8_0,q6_k,q5_k_m,q4_k_m,q4_0")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="gguf-export-"))
    model = convert()
    types = export_types(model, args.types.split(","), work)
    arch = architectures()
    print("| --type | MB | write s | export + certificate s | tokens | greedy equal | token agreement | logits vs mlxft | France |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in types:
        if "error" in r:
            print(f"| {r['type']} | failed: {r['error']} |")
            continue
        print(f"| {r['type']} | {r['mb']:.1f} | {r['write_s']:.1f} | {r['export_certified_s']:.1f} | "
              f"{'all equal' if r['tokens_ok'] else 'DIFFER'} | {r['equal']} of {r['prompts']} | {r['agreement']:.2f} | "
              f"{r['logits']:.1e} | {r['france'][:40]!r} |")
    print()
    print("| architecture | GGUF arch | f32: llama.cpp vs transformers | f16 |")
    print("| --- | --- | --- | --- |")
    for r in arch:
        print(f"| {r['model_type']} | {r['gguf']} | {r['f32']:.1e} | {r['f16']:.1e} |")
    (work / "gguf_export.json").write_text(json.dumps({"types": types, "architectures": arch}, indent=2))
    print(f"\nsaved {work / 'gguf_export.json'}")


if __name__ == "__main__":
    main()
