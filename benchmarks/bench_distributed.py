"""analyze(store=..., client=...) with 2 Dask worker processes against 1 process, on the digits CNN.

Same model, data, trajectory and method (Simpson: a fixed number of gradient evaluations, so both sides
do the same work up to the one extra evaluation per shard). Each worker runs one torch thread; the
single process is timed with one thread (the like-for-like baseline: the same cores doing the same
kernels) and with two (what one process gets from both cores). Runs alternate so drifting machine
load hits all alike; the cluster is started once and its start-up is reported apart.

    .venv/bin/python benchmarks/bench_distributed.py              # T=200, 8 shards of 25, 2 repeats
    .venv/bin/python benchmarks/bench_distributed.py --dask-malloc --two-threads   # and two more rows
    .venv/bin/python benchmarks/bench_distributed.py --steps 60 --repeats 1
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import cloudpickle
import torch
from dask.distributed import Client, LocalCluster

import lca_notebook as lca
from lca_notebook import models
from lca_notebook.distributed import Sharding
from lca_notebook.storage import results as store_mod


def single(snaps, x, y, path, threads):
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    r = lca.analyze(models.cnn(), (x, y), snaps, method="simpson", store=path, progress=False)
    return time.perf_counter() - t0, r


def sharded(client, snaps, x, y, path, shard, tune_malloc=True):
    t0 = time.perf_counter()
    sharding = Sharding(client, shard_iterations=shard, tune_malloc=tune_malloc)
    r = lca.analyze(models.cnn(), (x, y), snaps, client=sharding, store=path, method="simpson", progress=False)
    return time.perf_counter() - t0, r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--shard", type=int, default=25, help="iterations per shard (= store chunk here)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--two-threads", action="store_true", help="also time 1 process with 2 torch threads")
    ap.add_argument(
        "--dask-malloc", action="store_true", help="also time workers left with Dask's MALLOC_TRIM_THRESHOLD_"
    )
    args = ap.parse_args()
    store_mod.CHUNK_ITERATIONS = args.shard  # the driver creates the stores: shards of exactly one chunk
    torch.set_num_threads(1)
    x, y = models.digits_data(image=True)
    snaps = models.train(models.cnn(), (x, y), steps=args.steps, seed=0)
    tmp = tempfile.mkdtemp(prefix="bench_distributed_")
    n_params = sum(p.numel() for p in models.cnn().parameters())
    shipped = len(cloudpickle.dumps(((x, y), models.cnn())))
    window = len(cloudpickle.dumps(snaps[: args.shard + 1]))
    print(
        f"digits CNN: {n_params:,} parameters, {len(x)} samples, T={args.steps}, Simpson, shards of {args.shard}; "
        f"{os.cpu_count()} CPU cores; {os.getloadavg()[0]:.1f} load average at start"
    )
    print(
        f"shipped once per worker: {shipped / 1e6:.2f} MB (data + model); per shard task: {window / 1e6:.2f} MB of snapshots"
    )

    single(snaps[:3], x, y, os.path.join(tmp, "warm"), 1)  # warm-up (imports, allocator)
    t0 = time.perf_counter()
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None)
    client = Client(cluster)
    client.run(lambda: __import__("lca_notebook.engine"))
    startup = time.perf_counter() - t0
    first, _ = sharded(client, snaps[:4], x, y, os.path.join(tmp, "first"), 1)  # the job reaches both workers
    times = {"1 process, 1 thread": [], "2 workers x 1 thread": []}
    if args.two_threads:
        times["1 process, 2 threads"] = []
    if args.dask_malloc:
        times["2 workers x 1 thread, Dask's malloc setting"] = []
    evals = {}
    try:
        for i in range(args.repeats):
            t, r = single(snaps, x, y, os.path.join(tmp, f"s1-{i}"), 1)
            times["1 process, 1 thread"].append(t)
            evals["1 process"] = r.attrs["gradient_evaluations"]
            if args.dask_malloc:  # mallopt lasts for the process: fresh workers first, untouched
                client.restart()
                client.run(lambda: __import__("lca_notebook.engine"))
                t, _ = sharded(client, snaps, x, y, os.path.join(tmp, f"m-{i}"), args.shard, tune_malloc=False)
                times["2 workers x 1 thread, Dask's malloc setting"].append(t)
            t, r = sharded(client, snaps, x, y, os.path.join(tmp, f"d-{i}"), args.shard)
            times["2 workers x 1 thread"].append(t)
            evals["2 workers"] = r.attrs["gradient_evaluations"]
            if args.two_threads:
                t, _ = single(snaps, x, y, os.path.join(tmp, f"s2-{i}"), 2)
                times["1 process, 2 threads"].append(t)
                torch.set_num_threads(1)
    finally:
        client.close()
        cluster.close()
    base = statistics.median(times["1 process, 1 thread"])
    print()
    print("| run | median s | runs | speed-up vs 1 process, 1 thread |")
    print("| --- | --- | --- | --- |")
    for name, ts in times.items():
        print(
            f"| {name} | {statistics.median(ts):.2f} | {', '.join(f'{t:.1f}' for t in ts)} | **{base / statistics.median(ts):.2f}x** |"
        )
    print()
    print(f"cluster start-up (2 processes, torch imported): {startup:.1f} s; first tiny sharded call: {first:.1f} s")
    print(f"gradient evaluations: 1 process {evals['1 process']} (2T+1), 2 workers {evals['2 workers']} (2T + shards)")
    print(f"load average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
