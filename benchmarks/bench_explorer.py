"""Python-side latency of the explorer: from a control change to every mark updated (data computed,
reduced, set under hold_sync and serialized for the front end), for T=2000 x P=100k.

    .venv/bin/python benchmarks/bench_explorer.py [--iterations 2000] [--moves 30]

The result is synthetic (lca_notebook.result.from_arrays): three Linear layers (324 -> 256 -> 64 -> 10,
100,298 parameters), LCA decaying over training with a fifth of the entries exactly zero. Prints
medians and 90th percentiles; the target is a median <= 100 ms for slider moves.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from lca_notebook.result import from_arrays
from lca_notebook.widgets import Explorer

LAYERS = [("fc1", 324, 256), ("fc2", 256, 64), ("fc3", 64, 10)]


def synthetic_result(t: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    coords = {"tensor": [], "layer": [], "unit": [], "index": []}
    for name, fan_in, fan_out in LAYERS:
        for kind, n in (("weight", fan_in * fan_out), ("bias", fan_out)):
            coords["tensor"] += [f"{name}.{kind}"] * n
            coords["layer"] += [name] * n
            coords["unit"] += list(np.arange(n) // (n // fan_out))
            coords["index"] += list(range(n))
    p = len(coords["tensor"])
    lca = np.empty((t, p), dtype=np.float32)
    scale = (1e-4 * np.exp(-np.arange(t) / (t / 4)) + 1e-6).astype(np.float32)
    for t0 in range(0, t, 250):  # in blocks: keeps the temporaries small
        block = rng.standard_normal((min(250, t - t0), p), dtype=np.float32)
        block -= 0.1
        block *= scale[t0 : t0 + len(block), None]
        block[rng.random(block.shape) < 0.2] = 0.0
        lca[t0 : t0 + len(block)] = block
    loss = 2.3 + np.concatenate([[0.0], np.cumsum(lca.sum(1, dtype=np.float64))])
    return from_arrays(lca, loss, coords, attrs={"method": "synthetic"})


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=2000)
    ap.add_argument("--moves", type=int, default=30)
    args = ap.parse_args()
    rng = np.random.default_rng(1)

    t0 = time.perf_counter()
    result = synthetic_result(args.iterations)
    made = time.perf_counter() - t0
    t0 = time.perf_counter()
    ex = Explorer(result)
    built = time.perf_counter() - t0
    T, P = result.n_iterations, result.n_parameters
    print(
        f"result: T={T} x P={P} ({T * P * 4 / 1e9:.2f} GB float32), made in {made:.1f} s; explorer built in {built:.1f} s "
        f"(parameter prefix kept every {ex._parameters.stride} iterations)"
    )

    def slider_moves(label):
        times = []
        for _ in range(args.moves):
            a, b = sorted(rng.choice(T + 1, size=2, replace=False))
            times.append(timed(lambda: setattr(ex.range, "value", (int(a), int(b)))))
        return label, times

    rows = []
    for by in ("parameter", "unit", "tensor", "layer"):
        ex.granularity.value = by
        rows.append(slider_moves(f"slider move, by {by}, all layers"))
    ex.granularity.value = "parameter"
    ex.layer.value = "fc1"
    rows.append(slider_moves("slider move, by parameter, layer fc1"))
    ex.layer.value = None

    grans = []
    for _ in range(args.moves // 3 + 1):
        for by in ("unit", "tensor", "layer", "parameter"):
            grans.append(timed(lambda: setattr(ex.granularity, "value", by)))
    rows.append(("granularity change", grans))
    layers = []
    for _ in range(args.moves // 4 + 1):
        for name in ("fc1", "fc2", "fc3", None):
            layers.append(timed(lambda: setattr(ex.layer, "value", name)))
    rows.append(("layer change", layers))
    smooth = [timed(lambda: setattr(ex.smoothing, "value", int(w))) for w in rng.integers(1, 200, args.moves)]
    rows.append(("smoothing change", smooth))

    print(f"{'control change -> all marks updated':42s} {'n':>4s} {'median ms':>10s} {'p90 ms':>8s} {'max ms':>8s}")
    for label, times in rows:
        times = np.asarray(times)
        print(
            f"{label:42s} {len(times):4d} {np.median(times):10.1f} {np.percentile(times, 90):8.1f} {times.max():8.1f}"
        )
    sent = sum(
        np.asarray(getattr(m, k)).size
        for m in ex.marks.values()
        for k in ("x", "y", "color")
        if getattr(m, k, None) is not None
    )
    print(f"values held by all marks after the last change: {sent} (vs T x P = {T * P})")


if __name__ == "__main__":
    main()
