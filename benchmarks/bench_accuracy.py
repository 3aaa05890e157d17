"""What param_tol costs, and what it buys: evaluations, time and per-parameter error vs plain adaptive.

On the digits MLP and CNN (ReLU, trained with SGD + momentum), ``analyze`` runs with ``tol`` only (the paper's
rule, 1e-3) and with ``param_tol`` at two settings, given as fractions of the run's typical largest |LCA|
(the median over iterations of max_i |LCA[t, i]|) and passed in loss units. Each result is compared with a
converged reference: a float64 copy of the model, composite Simpson with ``--reference-pieces`` pieces (its own
``error`` estimate is printed; tests/test_accuracy.py checks the integral against Captum's integrated
gradients). Columns: gradient evaluations, time (median of ``--repeats``, alternating settings), the largest
per-parameter error made (relative to the iteration's largest |LCA|), the largest ``error`` estimate (same
units; NaN: no estimate), and the largest ratio error made / estimate over iterations (below 1: the estimate
bounds the error).

    .venv/bin/python benchmarks/bench_accuracy.py            # MLP T=20, CNN T=6, 3 repeats (a few minutes)
    .venv/bin/python benchmarks/bench_accuracy.py --quick    # T=6 and 3, 1 repeat, 64-piece reference
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import numpy as np
import torch

import lca_notebook as lca
from lca_notebook import models


def reference(model, data, snaps, pieces: int):
    """Composite Simpson with ``pieces`` pieces in float64: the converged per-parameter LCA."""
    x, y = data
    snaps64 = [{k: v.double() if v.is_floating_point() else v for k, v in s.items()} for s in snaps]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it is meant to hit max_splits
        r = lca.analyze(
            copy.deepcopy(model).double(), (x.double(), y), snaps64, tol=1e-300, max_splits=pieces, progress=False
        )
    return r.lca.values, r.error.values


def case(name, model, data, steps, repeats, ref_pieces, lr):
    snaps = models.train(model, data, steps=steps, lr=lr, seed=0)
    ref, ref_error = reference(model, data, snaps, ref_pieces)
    scale = np.abs(ref).max(axis=1)
    typical = float(np.median(scale))
    settings = [("tol=1e-3 only", None), ("param_tol 1e-3 of max|LCA|", 1e-3), ("param_tol 1e-4 of max|LCA|", 1e-4)]
    times: dict[str, list[float]] = {label: [] for label, _ in settings}
    results = {}
    for _ in range(repeats):
        for label, fraction in settings:
            param_tol = None if fraction is None else fraction * typical
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                results[label] = lca.analyze(model, data, snaps, param_tol=param_tol, progress=False)
            times[label].append(time.perf_counter() - t0)
    base_ev = results[settings[0][0]].attrs["gradient_evaluations"]
    base_t = statistics.median(times[settings[0][0]])
    print(
        f"\n{name}: {sum(p.numel() for p in model.parameters()):,} parameters, T={steps}, typical max |LCA| "
        f"{typical:.2e}; reference {ref_pieces} pieces in float64 (its largest estimate "
        f"{np.nanmax(ref_error / scale):.1e} of max |LCA|)\n"
    )
    print(
        "| setting | param_tol (loss units) | evaluations | x plain | time s (median) | x plain | pieces (median, max) "
        "| max error made / max abs LCA | max estimate / max abs LCA | max made / estimate |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, fraction in settings:
        r = results[label]
        made = np.abs(r.lca.values.astype(np.float64) - ref).max(axis=1)
        est = np.asarray(r.error.values)
        ratio = float(np.nanmax(made / est)) if np.isfinite(est).any() else float("nan")
        ev = r.attrs["gradient_evaluations"]
        t = statistics.median(times[label])
        pt = "-" if fraction is None else f"{fraction * typical:.1e}"
        splits = r.splits.values
        print(
            f"| {label} | {pt} | {ev} | {ev / base_ev:.2f} | {t:.2f} | {t / base_t:.2f} | "
            f"{int(np.median(splits))}, {int(splits.max())} | {float((made / scale).max()):.1e} | "
            f"{float(np.nanmax(est / scale)) if np.isfinite(est).any() else float('nan'):.1e} | {ratio:.2f} |"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--reference-pieces", type=int, default=None, help="default 256 (--quick: 64)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    pieces = args.reference_pieces or (64 if args.quick else 256)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    x, y = models.digits_data()
    case("digits MLP", models.mlp(seed=0), (x, y), 6 if args.quick else 20, repeats, pieces, 0.05)
    xi, yi = models.digits_data(image=True)
    n = 300  # a CNN gradient over all 1,797 images costs 19 ms: the float64 reference would take many minutes
    case(
        f"digits CNN ({n} images)", models.cnn(seed=0), (xi[:n], yi[:n]), 3 if args.quick else 6, repeats, pieces, 0.02
    )


if __name__ == "__main__":
    main()
