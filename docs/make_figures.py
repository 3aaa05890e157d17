"""Draw the pictures of docs/what-is-lca.md from a real run: an MLP trained on scikit-learn's digits.

    .venv/bin/python docs/make_figures.py [OUT_DIR]      # default: docs/img (the committed copy)

`bash .ci/docs` runs it again into the temporary copy it builds the site from, so the site always shows
what this version of the library computes. About 10 s on one CPU core; nothing downloads.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

import lca_notebook as lca
from lca_notebook import models


def main(out: Path) -> Path:
    torch.set_num_threads(1)
    x, y = models.digits_data()
    model = models.mlp(seed=0, hidden=(32,))
    snapshots = models.train(model, (x, y), steps=120, lr=0.1, momentum=0.9, seed=0)
    result = lca.analyze(model, (x, y), snapshots, progress=False)

    it = result.dataset["iteration"].values
    loss = result.loss.values
    rebuilt = result.reconstructed_loss().values
    per_layer = result.per_iteration(by="layer")  # (iteration, layer)
    cumulative = result.cumulative(by="layer")
    fractions = result.fractions()

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), constrained_layout=True)
    ax = axes[0]
    ax.plot(np.arange(len(loss)), loss, color="black", lw=2.5, label="full-data loss")
    ax.plot(np.arange(len(rebuilt)), rebuilt, color="#f28e2b", lw=1.2, ls="--", label="first loss + cumulative LCA")
    ax.set(title="The LCA adds up to the loss change", xlabel="checkpoint (iteration)", ylabel="loss")
    ax.text(0.98, 0.6, f"largest |residual| per iteration:\n{np.abs(result.residual.values).max():.1e}",
            transform=ax.transAxes, ha="right", fontsize=9)  # fmt: skip
    ax.legend(frameon=False)

    ax = axes[1]
    for layer in per_layer["layer"].values:
        ax.plot(it, cumulative.sel(layer=layer).values, label=f"{layer}")
    ax.axhline(0, color="grey", lw=0.6)
    ax.set(title="Cumulative LCA per layer (negative: helped)", xlabel="iteration", ylabel="LCA (loss units)")
    ax.legend(frameon=False)

    ax = axes[2]
    ax.plot(it, 100 * fractions["helped"].values, color="#2ca02c", label="helped (LCA < 0)")
    ax.plot(it, 100 * fractions["hurt"].values, color="#d62728", label="hurt (LCA > 0)")
    ax.plot(it, 100 * fractions["zero"].values, color="grey", label="did not move")
    ax.set(title="Parameters that helped and hurt", xlabel="iteration", ylabel="% of parameters", ylim=(0, 100))
    ax.legend(frameon=False)

    out.mkdir(parents=True, exist_ok=True)
    path = out / "lca-digits.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


if __name__ == "__main__":
    print(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "img"))
