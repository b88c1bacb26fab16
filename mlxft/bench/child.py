"""One backend's side of a benchmark, in a process of its own:

    python -m mlxft.bench.child WORKLOAD_JSON BACKEND THREADS RESULT_JSON [--no-gemm]

Its own process, so that its thread count is set before any BLAS starts, its memory peak is its
own, and one backend's caches cannot help or hurt the other. It measures the host's 1024³ GEMM
rate with the same threads first (not with --no-gemm: `mlxft plan` wants memory only), then
times the workload, and writes RESULT_JSON:
{"available": true, ...runner result, "gemm_gflops": {...}} or {"available": false, "reason": ...}.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path


def main(argv: list[str]) -> int:
    workload_path, backend, threads, result_path = argv[:4]
    measure_gemm = "--no-gemm" not in argv[4:]
    threads = int(threads)
    from mlxft.bench import gemm

    gemm.set_threads(threads)  # before numpy, mlx or torch start their pools
    from mlxft.bench import workload as workloads
    from mlxft.errors import UserError

    result: dict
    try:
        work = workloads.load(Path(workload_path)).for_backend(backend)
        from mlxft.bench import runner

        if backend == "mlx":
            rates = gemm.measure(("mlx", "numpy")) if measure_gemm else {}
            result = runner.run(work, backend)
            # the stock wheel's reference BLAS runs on one thread whatever the setting
            result["threads"] = gemm.openblas_threads() or 1
        elif backend == "torch":
            import torch

            torch.set_num_threads(threads)
            rates = gemm.measure(("torch", "numpy")) if measure_gemm else {}
            result = runner.run(work, backend)
            result["threads"] = torch.get_num_threads()
        else:
            raise UserError(f"unknown backend '{backend}'")
        result.update(available=True, gemm_gflops=rates)
    except UserError as e:
        result = {"backend": backend, "available": False, "reason": str(e)}
    except Exception:
        traceback.print_exc()
        return 1
    Path(result_path).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
