"""The embedded default: train a small MLP on scikit-learn's digits while recording its trajectory,
compute its LCA, print a summary, and open the quickstart notebook in JupyterLab.

    python -m lca_notebook                 # the whole job; JupyterLab serves until Ctrl-C
    python -m lca_notebook --no-lab        # stop after the summary
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch


def summarize(result) -> str:
    """A short text summary of a result: losses, residuals, helping fraction, layers."""
    loss = result.loss.values
    res = np.abs(result.residual.values)
    helped = result.fractions().helped.values
    by_layer = result.total(by="layer")
    change = loss[-1] - loss[0]
    lines = [
        f"{result.n_iterations} iterations x {result.n_parameters:,} parameters, method={result.attrs.get('method')}",
        f"loss {loss[0]:.4f} -> {loss[-1]:.4f} (change {change:+.4f}); sum of all LCA "
        f"{float(result.total(by='total')[0]) + float(result.lca_rest.sum()):+.4f}",
        f"|residual| per iteration: median {np.median(res):.1e}, max {res.max():.1e}",
        f"parameters helping per iteration: mean {helped.mean():.1%} (the paper: barely over 50%)",
        "LCA per layer (negative helps):",
    ]
    for layer, value in zip(by_layer["layer"].values, by_layer.values, strict=False):
        share = value / change if change else float("nan")
        lines.append(
            f"  {layer:<12} {value:+.4f}  ({share:.0%} of the loss change){'  <- hurt overall' if value > 0 else ''}"
        )
    return "\n".join(lines)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lca_notebook", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="training steps to record (default 300)")
    parser.add_argument("--out", default=".lca_runs", help="where the result is saved (default .lca_runs/)")
    parser.add_argument("--no-lab", action="store_true", help="do not start JupyterLab")
    parser.add_argument("--port", type=int, default=None)
    args = parser.parse_args(argv)

    import lca_notebook as lca
    from lca_notebook import models

    torch.manual_seed(0)
    x, y = models.digits_data()
    model = models.mlp(seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    print(
        f"training an MLP ({sum(p.numel() for p in model.parameters()):,} parameters) on digits for {args.steps} "
        "steps, recording ..."
    )
    with lca.record(model, opt) as trajectory:
        for _ in range(args.steps):
            idx = torch.randint(0, len(x), (64,), generator=g)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    print(f"computing LCA over all {len(x)} samples ...")
    result = lca.analyze(model, (x, y), trajectory)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    saved = result.save(out / "digits_mlp.nc")
    print(summarize(result))
    print(f"saved: {saved}  (lca_notebook.open({str(saved)!r}))")

    if args.no_lab:
        return 0
    root = Path(__file__).resolve().parent.parent / "example_notebooks"
    if not (root / "01_quickstart.ipynb").exists() or importlib.util.find_spec("jupyterlab") is None:
        print(
            "JupyterLab or the example notebooks are not here; run `bash .ci/setup` from a checkout of the repository."
        )
        return 0
    port = args.port or _free_port()
    token = secrets.token_hex(16)
    headless = not os.environ.get("DISPLAY") or os.environ.get("CI")
    url = f"http://localhost:{port}/lab/tree/01_quickstart.ipynb?token={token}"
    cmd = [
        sys.executable,
        "-m",
        "jupyter",
        "lab",
        str(root / "01_quickstart.ipynb"),
        f"--port={port}",
        f"--ServerApp.root_dir={root}",
        f"--IdentityProvider.token={token}",
        "--ServerApp.open_browser=" + ("False" if headless else "True"),
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    print("starting JupyterLab ...", flush=True)
    lab = subprocess.Popen(cmd)
    try:
        deadline = time.monotonic() + 120
        while lab.poll() is None and time.monotonic() < deadline:  # print the URL once it answers
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    print(f"\nthe explorer: open {url}\n(JupyterLab runs until Ctrl-C)", flush=True)
                    break
            time.sleep(0.2)
        return lab.wait()
    except KeyboardInterrupt:
        lab.terminate()
        lab.wait()
        return 0


if __name__ == "__main__":
    sys.exit(main())
