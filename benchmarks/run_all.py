"""Every benchmark in one run, side by side: their tables go to stdout and to benchmarks/results.md.

    .venv/bin/python benchmarks/run_all.py           # about 40 minutes on 2 cores
    .venv/bin/python benchmarks/run_all.py --quick   # a few minutes, smaller sizes

Each script runs in its own process, one after the other, on an otherwise idle machine: timings are
noisy on 2 shared cores, so every script reports medians and ratios measured within one process.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = [  # (script, full-run arguments, quick-run arguments, what it answers)
    ("bench_core.py", [], ["--quick"], "analyze vs the 2T+1 gradient floor (issue 2)"),
    ("bench_store.py", [], ["--quick"], "memory vs T, range-sum latency, recording overhead (issue 3)"),
    ("bench_explorer.py", [], ["--quick"], "explorer update latency, T=2000 x P=100k (issue 4)"),
    ("bench_analyses.py", [], ["--iterations", "300", "--parameters", "20000"], "the paper's analyses (issue 5)"),
    ("bench_distributed.py", [], ["--steps", "60", "--repeats", "1"], "2 Dask workers vs 1 process (issue 6)"),
    ("bench_accuracy.py", [], ["--quick"], "param_tol: evaluations and the error made vs its estimate (issue 12)"),
    ("bench_follow.py", ["--explorer"], ["--quick"], "LCA while the model trains: lag and memory (issue 14)"),
    ("bench_scale.py", [], ["--quick"], "10M parameters (MLP, ResNet): store per keep, RSS vs T, floor (issue 15)"),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results.md"))
    args = ap.parse_args()
    import torch

    lines = [
        f"# Benchmark results ({datetime.date.today()}, {'quick' if args.quick else 'full'} run)",
        "",
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}",
        "",
    ]
    for script, full, quick, what in SCRIPTS:
        path = HERE / script
        if not path.exists():
            continue
        cmd = [sys.executable, str(path), *(quick if args.quick else full)]
        print(f"\n## {script}: {what}\n$ {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        took = time.perf_counter() - t0
        print(proc.stdout, flush=True)
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
        lines += [
            f"## {script}: {what}",
            "",
            f"`{' '.join(['python', *cmd[1:]]).replace(str(HERE.parent) + '/', '')}` ({took:.0f} s, exit {proc.returncode})",
            "",
            proc.stdout.strip(),
            "",
        ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"\nwritten: {args.out}")


if __name__ == "__main__":
    main()
