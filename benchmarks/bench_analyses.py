"""Time each analysis on a large synthetic result (in memory and as a zarr store): prints medians.

    .venv/bin/python benchmarks/bench_analyses.py [--iterations 1000] [--parameters 50000] [--repeat 3]

The LCA values are random (the analyses' cost does not depend on them); layers are 5 equal blocks.
"""

import argparse
import statistics
import tempfile
import time

import numpy as np

from lca_notebook import analyses
from lca_notebook.result import from_arrays


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=1000)
    ap.add_argument("--parameters", type=int, default=50_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    t, p = args.iterations, args.parameters
    rng = np.random.default_rng(0)
    lca = (rng.standard_normal((t, p), dtype=np.float32) * 1e-5 - 2e-7).astype(np.float32)
    layer = np.repeat([f"l{i}" for i in range(5)], -(-p // 5))[:p]
    coords = {"tensor": np.char.add(layer, ".weight"), "layer": layer, "unit": np.arange(p) % 64, "index": np.arange(p)}
    loss = 2.0 + np.concatenate([[0.0], np.cumsum(lca.sum(axis=1, dtype=np.float64))])
    result = from_arrays(lca, loss, coords)
    print(f"result: {t} iterations x {p} parameters ({lca.nbytes / 2**20:.0f} MiB float32)")

    def bench(name, fn):
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        print(f"  {name:<28} median {statistics.median(times):7.3f} s")

    def suite(r, label):
        print(label)
        bench("fractions(by='layer')", lambda: analyses.fractions(r, by="layer"))
        bench("layer_totals", lambda: analyses.layer_totals(r))
        bench("per_window(unit, 50)", lambda: analyses.per_window(r, by="unit", windows=50))
        bench("synchrony (1000 perms)", lambda: analyses.synchrony(r, n_permutations=1000))
        bench("oscillation (no traj.)", lambda: analyses.oscillation(r))
        bench("concentration", lambda: analyses.concentration(r))

    suite(result, "in memory (prefix sums built on first use, then cached):")
    with tempfile.TemporaryDirectory() as d:
        path = result.save(f"{d}/r.zarr")
        import lca_notebook as lca_pkg

        suite(lca_pkg.open(path), "opened lazily from a zarr store:")


if __name__ == "__main__":
    main()
