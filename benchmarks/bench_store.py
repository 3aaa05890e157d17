"""Memory and speed of recording and of results streamed to a store; prints a small table.

    .venv/bin/python benchmarks/bench_store.py           # T=250 vs T=2000, about 5-8 minutes on 2 cores
    .venv/bin/python benchmarks/bench_store.py --quick   # T=50 vs T=400, about a minute

1. Peak resident memory of ``analyze(..., store=...)`` on a ~100k-parameter MLP (digits), trajectory
   read from a recorder store, for a short and an 8x longer run, each in a fresh process.
   Memory must not grow with T: ratio <= 1.2.
2. Iteration-range sums on the long stored result (T x 100k parameters): median time over random
   ranges at each granularity (target < 50 ms).
3. Training step time of a ~1.1M-parameter MLP with ``lca.record(path=...)`` at every step / without
   (median over interleaved blocks; target <= 1.2).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from sklearn.datasets import load_digits
from torch import nn

import lca_notebook as lca
from lca_notebook.sources import open_path


def digits():
    d = load_digits()
    return torch.tensor(d.data / 16.0, dtype=torch.float32), torch.tensor(d.target)


def mlp_100k():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 32), nn.ReLU(), nn.Linear(32, 10))


def record_run(path, steps):
    x, y = digits()
    model = mlp_100k()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with lca.record(model, opt, path=path):
        for i in range(steps):
            idx = torch.arange(i * 128, i * 128 + 128) % len(x)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()


def child_rss(traj, out):
    """Runs in a fresh process: analyze into a store, print baseline and peak RSS in MB."""
    x, y = digits()
    model = mlp_100k()
    first = open_path(traj)  # warm up on one iteration (an in-memory result of all T would be T x P)
    lca.analyze(
        model, (x[:256], y[:256]), lca.Trajectory.from_callable(first.load, 2), method="trapezoid", progress=False
    )
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    r = lca.analyze(model, (x, y), traj, method="trapezoid", store=out, progress=False)
    seconds = time.perf_counter() - t0
    r.total("layer")  # touch the result
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"RSS {base:.1f} {peak:.1f} {seconds:.2f} {r.n_parameters}")


def bench_rss(tmp, ts):
    rows = {}
    for t in ts:
        traj, out = os.path.join(tmp, f"traj{t}"), os.path.join(tmp, f"lca{t}")
        record_run(traj, t)
        res = subprocess.run([sys.executable, __file__, "--child-rss", traj, out], capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(f"the T={t} child failed:\n{res.stderr[-3000:]}")
        line = [ln for ln in res.stdout.splitlines() if ln.startswith("RSS ")][-1]
        base, peak, seconds, p = line.split()[1:]
        rows[t] = (float(base), float(peak), float(seconds), int(p))
        shutil.rmtree(traj)
    return rows


def bench_range_sums(store_path, repeats):
    r = lca.open(store_path)
    rng = np.random.default_rng(0)
    t = r.n_iterations
    out = {}
    for by in ("parameter", "unit", "layer", "total"):
        times = []
        for _ in range(repeats):
            a, b = sorted(rng.integers(0, t + 1, size=2))
            t0 = time.perf_counter()
            v = r.total(by, int(a), int(b))
            times.append(time.perf_counter() - t0)
        out[by] = (np.median(times) * 1e3, np.max(times) * 1e3, v.size)
    return r.n_iterations, r.n_parameters, out


def bench_recording(tmp, blocks, steps_per_block):
    x, y = digits()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    xb, yb = x[:1024], y[:1024]

    def step():
        opt.zero_grad()
        nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()

    for _ in range(5):
        step()
    plain, recorded, totals = [], [], {"plain": 0.0, "recorded": 0.0}
    for b in range(blocks):  # interleaved, so drifts in machine load hit both
        t_block = time.perf_counter()
        for _ in range(steps_per_block):
            t0 = time.perf_counter()
            step()
            plain.append(time.perf_counter() - t0)
        totals["plain"] += time.perf_counter() - t_block
        path = os.path.join(tmp, f"rec{b}")
        t_block = time.perf_counter()
        with lca.record(model, opt, path=path):  # every step, to disk
            for _ in range(steps_per_block):
                t0 = time.perf_counter()
                step()
                recorded.append(time.perf_counter() - t0)
        totals["recorded"] += time.perf_counter() - t_block  # includes waiting for the last writes
        shutil.rmtree(path)
    return n_params, np.median(plain), np.median(recorded), totals["recorded"] / totals["plain"]


def _print_rss(rss, t_rss):
    print("1. peak RSS of analyze(store=...), trajectory from a recorder store, fresh process each")
    print(f"   {'T':>6} {'params':>8} {'base MB':>9} {'peak MB':>9} {'seconds':>8}")
    for t, (base, peak, seconds, p) in rss.items():
        print(f"   {t:>6} {p:>8} {base:>9.1f} {peak:>9.1f} {seconds:>8.1f}")
    (t_a, a), (t_b, b) = rss.items()
    print(f"   peak RSS ratio T={t_b} / T={t_a}: {b[1] / a[1]:.3f}  (target <= 1.2)   [{t_rss:.0f} s]")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child-rss", nargs=2, metavar=("TRAJ", "OUT"))
    ap.add_argument("--only-rss", action="store_true", help="part 1 only")
    args = ap.parse_args()
    if args.child_rss:
        child_rss(*args.child_rss)
        return
    ts = (50, 400) if args.quick else (250, 2000)
    tmp = tempfile.mkdtemp(prefix="lca_bench_store_")
    try:
        t0 = time.perf_counter()
        rss = bench_rss(tmp, ts)
        t_rss = time.perf_counter() - t0
        if args.only_rss:
            _print_rss(rss, t_rss)
            return
        iters, params, sums = bench_range_sums(os.path.join(tmp, f"lca{ts[-1]}"), 30 if args.quick else 100)
        for t in ts:
            shutil.rmtree(os.path.join(tmp, f"lca{t}"))
        n_params, plain, recorded, total_ratio = bench_recording(tmp, 3, 8 if args.quick else 20)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"\nlca_notebook store benchmarks ({'quick' if args.quick else 'full'}; torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs)\n"
    )
    _print_rss(rss, t_rss)
    print(f"\n2. iteration-range sum on the stored result, {iters} iterations x {params} parameters (random ranges)")
    print(f"   {'by':>10} {'median ms':>10} {'max ms':>8} {'values':>8}")
    for by, (med, mx, size) in sums.items():
        print(f"   {by:>10} {med:>10.2f} {mx:>8.2f} {size:>8}")
    print("   (target: under 50 ms)")
    print(f"\n3. training step of a {n_params / 1e6:.2f}M-parameter MLP (batch 1024), recording every step to disk")
    print(
        f"   median step: {plain * 1e3:.1f} ms without, {recorded * 1e3:.1f} ms with recording; ratio {recorded / plain:.3f} (target <= 1.2)"
    )
    print(f"   whole blocks incl. the final flush: ratio {total_ratio:.3f}")


if __name__ == "__main__":
    main()
