"""The cross-backend benchmark harness behind `mlxft bench` and `mlxft doctor`.

    mlxft bench --workload lora --backends mlx,torch            # built-in model, bundled TALLRec rows
    mlxft bench --workload dpo --backends mlx --model M --steps 20

workload.py builds one set of batches and one starting adapter; runners.py times the trainers'
own step functions on them, one backend per child process (child.py), so each side gets its own
thread settings and memory peak; harness.py puts the results side by side (table, bench.json,
bench.png). flops.py says how model FLOPs are counted; gemm.py measures the host's matrix-product
rate, which the share-of-peak column divides by.
"""
