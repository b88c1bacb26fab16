"""One rank of the all-reduce probe (benchmarks/data_parallel.py): the seconds an all-reduce of N
float32 values takes between the ranks of a launcher, the median of 20 after 3 untimed.

    mlx.launch -n 2 --backend ring -- python allreduce_probe.py mlx N result.json
    torchrun --nproc-per-node 2 allreduce_probe.py torch N result.json
"""

import json
import statistics
import sys
import time

backend, floats, result = sys.argv[1], int(sys.argv[2]), sys.argv[3]
times = []
if backend == "mlx":
    import mlx.core as mx

    group = mx.distributed.init(strict=True)
    rank = group.rank()
    buffer = mx.ones((floats,), mx.float32)
    mx.eval(buffer)
    for i in range(23):
        start = time.perf_counter()
        mx.eval(mx.distributed.all_sum(buffer, group=group))
        times.append(time.perf_counter() - start)
else:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    buffer = torch.ones(floats)
    for i in range(23):
        start = time.perf_counter()
        dist.all_reduce(buffer)
        times.append(time.perf_counter() - start)
if rank == 0:
    with open(result, "w") as f:
        json.dump({"backend": backend, "floats": floats, "seconds": statistics.median(times[3:])}, f)
if backend == "torch":
    dist.destroy_process_group()  # gloo aborts a process that exits with its group still up
