"""analyze(method="simpson") against its floor: 2T+1 plain full-data gradient evaluations.

The floor evaluates the same model on the same data at the same 2T+1 points (every snapshot and
every midpoint, prepared before the clock starts) with ``functional_call`` + ``torch.autograd.grad``
and nothing else. The ratio analyze / floor is what the library spends beyond the mathematics.
Runs alternate (floor, analyze, floor, analyze, ...) so drifting machine load hits both alike.

    .venv/bin/python benchmarks/bench_core.py            # MLPs T=300/200 and CNN T=200, 9 pairs (27 and 13 for the fastest)
    .venv/bin/python benchmarks/bench_core.py --quick    # T=60, 3 repeats
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch
from torch.func import functional_call

import lca_notebook as lca
from lca_notebook import models


def floor(model, x, y, points) -> float:
    names = [n for n, _ in model.named_parameters()]
    t0 = time.perf_counter()
    for p in points:
        leaves = {n: p[n].detach().requires_grad_() for n in names}
        loss = torch.nn.functional.cross_entropy(functional_call(model, leaves, (x,)), y)
        torch.autograd.grad(loss, list(leaves.values()))
    return time.perf_counter() - t0


def case(name, model, x, y, steps, repeats, lr=0.05):
    snaps = models.train(model, (x, y), steps=steps, lr=lr, seed=0)
    names = [n for n, _ in model.named_parameters()]
    points = [{n: snaps[0][n] for n in names}]
    for a, b in itertools.pairwise(snaps):
        points.append({n: (a[n] + b[n]) / 2 for n in names})
        points.append({n: b[n] for n in names})
    assert len(points) == 2 * steps + 1
    lca.analyze(model, (x, y), snaps[:3], method="simpson", progress=False)  # warm-up
    floor(model, x, y, points[:5])
    ratios, t_floor, t_lca, batched = [], [], [], []
    for _ in range(repeats):
        f = floor(model, x, y, points)
        t0 = time.perf_counter()
        result = lca.analyze(model, (x, y), snaps, method="simpson", progress=False)
        a = time.perf_counter() - t0
        t_floor.append(f)
        t_lca.append(a)
        ratios.append(a / f)
    # The batched-points path against the plain one, in pairs of their own (not between the floor's runs).
    for _ in range(max(3, repeats // 3)):
        t0 = time.perf_counter()
        lca.analyze(model, (x, y), snaps, method="simpson", progress=False)
        a = time.perf_counter() - t0
        t0 = time.perf_counter()
        lca.analyze(model, (x, y), snaps, method="simpson", batched_points=True, progress=False)
        batched.append((time.perf_counter() - t0) / a)
    n_params = sum(p.numel() for p in model.parameters())
    res = float(abs(result.residual).max())
    print(
        f"| {name} | {n_params:,} | {steps} | {statistics.median(t_floor):.2f} | {statistics.median(t_lca):.2f} "
        f"| **{statistics.median(ratios):.3f}** | {min(ratios):.3f}-{max(ratios):.3f} | {res:.1e} | {statistics.median(batched):.2f} |"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 9)  # the machine is shared: more pairs, steadier medians
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, digits ({len(models.digits_data()[0])} samples, one batch)\n"
    )
    print(
        "| model | parameters | T | floor s (median) | analyze s (median) | ratio (median) | ratio range | max abs residual | batched_points / plain |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    x, y = models.digits_data()
    # The quickstart's model (64 -> 32 -> 10), the one issue 15 measured: the smallest gradient, so the most overhead.
    # Pairs vary by +-15% on this shared machine: the fast models get more of them (about 30 s each model).
    case("digits MLP, quickstart", models.mlp(seed=0, hidden=(32,)), x, y, 60 if args.quick else 300, 3 * repeats)
    case("digits MLP", models.mlp(seed=0), x, y, 60 if args.quick else 300, repeats + repeats // 2)
    # The design notes' size: an 84k-parameter MLP (64 -> 512 -> 100 -> 10).
    case("digits MLP, wide", models.mlp(seed=0, hidden=(512, 100)), x, y, 60 if args.quick else 200, repeats)
    xi, yi = models.digits_data(image=True)
    case("digits CNN", models.cnn(seed=0), xi, yi, 60 if args.quick else 200, repeats, lr=0.02)


if __name__ == "__main__":
    main()
