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
4. Checksums (``--only-checksums``; ``--checksum-params P``, default 100k): write and read throughput of a
   stored T=2000 x P result (``lca``, float32, the store's chunks, written and fsynced a chunk at a time as
   ``analyze(store=...)`` does; read back chunk by chunk from the page cache) with and without the CRC32C
   of every chunk, interleaved; the cost per iteration (the codec's CPU work, and the measured write
   difference, plus the snapshot hash) against analyze's time per iteration on the ~100k-parameter MLP
   (target: within 2%).
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
import zarr
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


def bench_checksums(tmp, t=2000, p=100_000, repeats=3):
    """Write/read seconds of a T x P float32 ``lca`` array, plain and checksummed (medians over interleaved
    repeats), and what the checksums and snapshot hashes cost analyze per iteration."""
    import google_crc32c

    from lca_notebook.storage import files
    from lca_notebook.storage.results import _chunking, snapshot_hash

    ct, cp = _chunking(p)
    block = np.random.default_rng(0).normal(size=(ct, p)).astype(np.float32)
    times = {kind: {"write": [], "read": []} for kind in ("plain", "crc32c")}
    for rep in range(repeats):
        for kind in ("plain", "crc32c"):  # interleaved: drifts in machine load hit both
            path = os.path.join(tmp, f"ck-{kind}-{rep}")
            codecs = files.checksummed() if kind == "crc32c" else None

            def create(d, codecs=codecs):
                root = zarr.open_group(d, mode="w-", zarr_format=3)
                root.create_array(
                    "lca", shape=(t, p), chunks=(ct, cp), dtype=np.float32, compressors=codecs, fill_value=0
                )

            files.create_atomically(path, create)
            arrays = files.Arrays(path, ["lca"])
            t0 = time.perf_counter()
            for a in range(0, t, ct):
                arrays.write(a, {"lca": block[: min(ct, t - a)]})
            times[kind]["write"].append(time.perf_counter() - t0)
            arr = files.open_array(path, "lca", "r")
            t0 = time.perf_counter()
            for a in range(0, t, ct):
                arr[a : a + ct]
            times[kind]["read"].append(time.perf_counter() - t0)
            shutil.rmtree(path)
    # The same through zarr's whole pipeline into memory (zarr.storage.MemoryStore): no disk, so no disk noise.
    mem = {kind: {"write": [], "read": []} for kind in ("plain", "crc32c")}
    for _ in range(repeats):
        for kind in ("plain", "crc32c"):
            arr = zarr.create_array(
                zarr.storage.MemoryStore(), shape=(t, p), chunks=(ct, cp), dtype=np.float32, fill_value=0,
                compressors=files.checksummed() if kind == "crc32c" else None, config={"write_empty_chunks": True},
            )  # fmt: skip
            t0 = time.perf_counter()
            for a in range(0, t, ct):
                arr[a : a + ct] = block[: min(ct, t - a)]
            mem[kind]["write"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for a in range(0, t, ct):
                arr[a : a + ct]
            mem[kind]["read"].append(time.perf_counter() - t0)
            del arr
    med = {k: {op: float(np.median(v)) for op, v in ops.items()} for k, ops in times.items()}
    med |= {f"{k} (memory)": {op: float(np.median(v)) for op, v in ops.items()} for k, ops in mem.items()}
    raw = block.tobytes()
    t0 = time.perf_counter()
    for _ in range(10):
        google_crc32c.value(raw)
    crc_gbs = 10 * len(raw) / (time.perf_counter() - t0) / 1e9

    # analyze's own time per iteration on the 100k MLP (trapezoid: one gradient evaluation per iteration, the
    # cheapest rule, so the largest relative overhead), and the snapshot hash the store adds per iteration.
    x, y = digits()
    model = mlp_100k()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    with lca.record(model, opt) as rec:
        for i in range(32):
            idx = torch.arange(i * 128, i * 128 + 128) % len(x)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    snaps = [rec[k] for k in range(len(rec))]
    lca.analyze(model, (x, y), snaps[:3], method="trapezoid", progress=False)  # warm up
    t0 = time.perf_counter()
    lca.analyze(model, (x, y), snaps, method="trapezoid", progress=False)
    per_iteration = (time.perf_counter() - t0) / (len(snaps) - 1)
    from lca_notebook.layout import build_spec

    spec = build_spec(model, snaps[0])
    t0 = time.perf_counter()
    for s in snaps:
        snapshot_hash(s, spec)
    hash_s = (time.perf_counter() - t0) / len(snaps)

    # The codec's own CPU work per chunk (what zarr's crc32c codec does: checksum, then append it), free of disk noise.
    t0 = time.perf_counter()
    for _ in range(10):
        data = np.frombuffer(raw, np.uint8)
        np.append(data, np.array([google_crc32c.value(data)], dtype=np.uint32).view("B"))
    codec_s = (time.perf_counter() - t0) / 10
    return {
        "t": t, "p": p, "ct": ct, "mb": t * p * 4 / 1e6, "med": med, "crc_gbs": crc_gbs,
        "analyze_per_iteration": per_iteration, "hash_per_snapshot": hash_s,
        "model_params": sum(q.numel() for q in model.parameters()),
        "codec_per_chunk": codec_s,
    }  # fmt: skip


def _print_checksums(c):
    mb, med = c["mb"], c["med"]
    print(f"4. checksums: a stored {c['t']} x {c['p']} float32 lca ({mb:.0f} MB, chunks of {c['ct']} iterations)")
    print(f"   {'':>17} {'write s':>8} {'MB/s':>7} {'read s':>8} {'MB/s':>7}")
    for kind in ("plain", "crc32c", "plain (memory)", "crc32c (memory)"):
        w, r = med[kind]["write"], med[kind]["read"]
        print(f"   {kind:>17} {w:>8.2f} {mb / w:>7.0f} {r:>8.2f} {mb / r:>7.0f}")
    for where, suffix in (("disk, written and fsynced", ""), ("zarr pipeline in memory", " (memory)")):
        plain, crc = med["plain" + suffix], med["crc32c" + suffix]
        print(
            f"   checksum cost, {where}: write {100 * (crc['write'] / plain['write'] - 1):+.1f}%,"
            f" read {100 * (crc['read'] / plain['read'] - 1):+.1f}%"
        )
    print(f"   (crc32c alone: {c['crc_gbs']:.1f} GB/s)")
    dw = med["crc32c (memory)"]["write"] - med["plain (memory)"]["write"]
    codec = c["codec_per_chunk"]
    print(
        f"   the codec's CPU work per chunk ({c['ct']} iterations, {c['ct'] * c['p'] * 4 / 1e6:.1f} MB): {1e3 * codec:.1f} ms"
        f" = {1e3 * codec / c['ct']:.3f} ms per iteration"
    )
    a = c["analyze_per_iteration"]
    # A result store writes 12 P bytes per iteration (lca float32 and prefix_parameter float64), 3x lca's.
    for label, cost in (
        ("codec CPU, whole store", 3 * codec / c["ct"]),
        ("measured lca write in memory", max(dw, 0.0) / c["t"]),
    ):
        per_it = cost + c["hash_per_snapshot"]
        print(
            f"   per iteration ({label}): {1e3 * cost:.3f} ms + snapshot hash {1e3 * c['hash_per_snapshot']:.3f} ms"
            f" = {1e3 * per_it:.3f} ms against analyze {1e3 * a:.1f} ms (trapezoid, digits, MLP of"
            f" {c['model_params']} params): {100 * per_it / a:.2f}% (target: within 2%)"
        )


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
    ap.add_argument("--only-checksums", action="store_true", help="part 4 only")
    ap.add_argument("--checksum-params", type=int, default=100_000, help="P of part 4 (T is 2000)")
    args = ap.parse_args()
    if args.child_rss:
        child_rss(*args.child_rss)
        return
    if args.only_checksums:
        tmp = tempfile.mkdtemp(prefix="lca_bench_store_")
        try:
            _print_checksums(bench_checksums(tmp, 400 if args.quick else 2000, args.checksum_params))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
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
        checksums = bench_checksums(tmp, 400 if args.quick else 2000, args.checksum_params)
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
    print()
    _print_checksums(checksums)


if __name__ == "__main__":
    main()
