"""LCA while the model trains (``analyze(..., follow=True)``): how far it lags behind, and its memory.

    .venv/bin/python benchmarks/bench_follow.py            # 400 steps, a step every 40 ms (~1 minute on 2 cores)
    .venv/bin/python benchmarks/bench_follow.py --quick    # 120 steps
    .venv/bin/python benchmarks/bench_follow.py --pace 0   # train flat out: how far the LCA falls behind

A subprocess trains the digits MLP (``models.mlp()``, 64-128-64-10, minibatches of 64, SGD) recording every
step to a trajectory store, and notes when each snapshot is on disk (``Recorder.flush``). This process
follows it with ``analyze(..., follow=True, store=...)`` (Simpson, the full training split as the data),
while a watcher thread notes when each iteration becomes readable in the result store (what an explorer
can draw) and, with ``--explorer``, the time ``Explorer.refresh()`` takes to draw it (in the kernel: no
browser). Reported:

- lag: from snapshot k+1 on disk to iteration k readable, median and 90th percentile (seconds);
- how far behind the LCA is at the end of training (iterations);
- memory: this process's resident set (VmRSS) over the first and the last quarter of the run, median, and
  the peak (flat: the last quarter within a few MB of the first).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import numpy as np
import torch

import lca_notebook as lca
from lca_notebook import models
from lca_notebook.storage.files import read_attrs

TRAINER = textwrap.dedent(
    """
    import json, sys, time
    import torch
    import lca_notebook as lca
    from lca_notebook import models

    args = json.loads(sys.argv[1])
    model = models.mlp()
    x, y = models.digits_data("train")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    written = []
    with lca.record(model, opt, path=args["path"]) as rec:
        rec.flush()
        written.append(time.time())
        for step in range(args["steps"]):
            t0 = time.perf_counter()
            idx = torch.randint(0, len(x), (64,), generator=g)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            rec.flush()
            written.append(time.time())
            time.sleep(max(0.0, args["pace"] - (time.perf_counter() - t0)))
    with open(args["log"], "w") as f:
        json.dump(written, f)
    """
)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--pace", type=float, default=0.04, help="seconds per training step (0: flat out)")
    parser.add_argument("--poll", type=float, default=0.02, help="the follower's poll interval (seconds)")
    parser.add_argument("--explorer", action="store_true", help="also time Explorer.refresh() for each new row")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    steps = 120 if args.quick else args.steps
    torch.set_num_threads(1)

    tmp = tempfile.mkdtemp(prefix="bench-follow-")
    path, store, log = (os.path.join(tmp, n) for n in ("trajectory.zarr", "lca.zarr", "written.json"))
    script = os.path.join(tmp, "train.py")
    with open(script, "w") as f:
        f.write(TRAINER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    trainer = subprocess.Popen(
        [sys.executable, script, json.dumps({"path": path, "steps": steps, "pace": args.pace, "log": log})], env=env
    )

    visible: dict[int, float] = {}  # iteration -> when it became readable in the result store
    drawn: list[float] = []  # seconds Explorer.refresh() took for each refresh that found new rows
    rss: list[tuple[float, float]] = []  # (time, MB)
    done = threading.Event()

    def watch():
        seen, explorer = 0, None
        while not done.is_set():
            try:
                n = int(read_attrs(store).get("completed_iterations", 0))
            except (OSError, ValueError):
                n = 0
            now = time.time()
            for k in range(seen, n):
                visible[k] = now
            if n > seen and args.explorer:
                t0 = time.perf_counter()
                if explorer is None:
                    with contextlib.suppress(ValueError):  # the store mid-growth (arrays resized one by one)
                        explorer = lca.explore(store)
                elif explorer.refresh():
                    drawn.append(time.perf_counter() - t0)
            seen = max(seen, n)
            rss.append((now, rss_mb()))
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t0 = time.time()
    result = lca.analyze(
        models.mlp(), models.digits_data("train"), path, store=store, follow=True, poll=args.poll,
        method="simpson", progress=False,
    )  # fmt: skip
    t1 = time.time()
    trainer.wait()
    time.sleep(0.05)  # the watcher's last look (a benchmark, not a test)
    done.set()
    watcher.join()
    with open(log) as f:
        written = json.load(f)
    training_end = written[-1]
    lags = np.array([visible[k] - written[k + 1] for k in range(result.n_iterations) if k in visible])
    behind_at_end = sum(1 for k in range(result.n_iterations) if visible.get(k, np.inf) > training_end)
    times = np.array([r[0] for r in rss])
    mb = np.array([r[1] for r in rss])
    q = (times.max() - times.min()) / 4
    first, last = mb[times <= times.min() + q], mb[times >= times.max() - q]
    print(f"digits MLP ({sum(p.numel() for p in models.mlp().parameters())} parameters), {steps} steps, "
          f"a step every {args.pace * 1000:.0f} ms, Simpson over {len(models.digits_data('train')[0])} samples")  # fmt: skip
    print(f"LCA per iteration (follow, this run): {(t1 - t0) / result.n_iterations * 1000:.1f} ms")
    print(f"lag snapshot on disk -> its iteration readable: median {np.median(lags) * 1000:.0f} ms, "
          f"p90 {np.percentile(lags, 90) * 1000:.0f} ms, max {lags.max() * 1000:.0f} ms")  # fmt: skip
    print(f"iterations not yet readable when training ended: {behind_at_end}; LCA done "
          f"{t1 - training_end:.2f} s after training")  # fmt: skip
    if drawn:
        print(f"Explorer.refresh() per new row(s): median {np.median(drawn) * 1000:.0f} ms over {len(drawn)}")
    print(f"RSS (MB): first quarter median {np.median(first):.1f}, last quarter median {np.median(last):.1f}, "
          f"peak {mb.max():.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
