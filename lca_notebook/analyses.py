"""The paper's findings as functions of an :class:`~lca_notebook.LCAResult`, one question per call.

Lan et al. (2019) report, for networks trained on MNIST and CIFAR-10:

- barely over 50% of parameters help (LCA < 0) on any given iteration -> :func:`fractions`;
- some entire layers hurt overall (for a ResNet on CIFAR-10, the first and last) -> :func:`layer_totals`;
- learning is synchronised across layers, often peaking on the same iterations -> :func:`synchrony`;
- training oscillates: parameters switch direction often -> :func:`oscillation`;
- first-order LCA drifts far from the true loss, the Runge-Kutta (Simpson) rule does not -> :func:`rule_accuracy`.

Plus :func:`concentration` (how few parameters do most of the learning), :func:`per_window` (sums over
windows of iterations, e.g. which channels learn when) and :func:`findings` (all of the above beside
the paper's statements, in one table).

Conventions: LCA < 0 means the parameter lowered the loss ("helped"); "learning" is ``-LCA``. Every
function streams over iterations in blocks or uses the result's prefix sums, so it works on results
opened lazily from disk. Nothing here imports widgets.

>>> import lca_notebook as lca
>>> from lca_notebook import analyses
>>> r = lca.LCAResult.example()
>>> analyses.layer_totals(r)["hurts"].values.tolist()
[False, True]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import xarray as xr

from .api import analyze
from .result import LCAResult
from .sources import as_trajectory

__all__ = [
    "RULES",
    "Finding",
    "Findings",
    "concentration",
    "findings",
    "fractions",
    "gini",
    "hurting_layers",
    "layer_totals",
    "oscillation",
    "peaks",
    "per_window",
    "residual_table",
    "rule_accuracy",
    "synchrony",
]

_ROWS = 256  # iterations read per block when streaming over (iteration, parameter)

#: The rules :func:`rule_accuracy` compares, cheapest first.
RULES = ("first_order", "trapezoid", "simpson", "adaptive")


def _labels(result: LCAResult, by: str) -> np.ndarray:
    return np.asarray(result.groups.labels(by))


def _rows(result: LCAResult, start: int, stop: int):
    for t0 in range(start, stop, _ROWS):
        yield t0, np.asarray(result.lca[t0 : min(t0 + _ROWS, stop)].values)


def _check_by(by: str, allowed=("total", "layer", "tensor", "unit", "parameter")):
    if by not in allowed:
        raise ValueError(f"by must be one of {allowed}, got {by!r}")


# -- fractions ----------------------------------------------------------------------------------
def fractions(
    result: LCAResult, by: str = "total", start: int | None = None, stop: int | None = None, *, uncertain: bool = False
) -> xr.Dataset:
    """Fractions of parameters that help, hurt or do not move the loss at each iteration, with their means.

    A thin wrapper over :meth:`LCAResult.fractions` (``helped``, ``hurt``, ``zero``: ``(iteration[, group])``)
    that adds, over the iterations: ``mean_helped``, ``mean_hurt``, ``mean_zero`` and
    ``helped_among_moving`` (helped / (helped + hurt): the paper's "barely over 50%" counts parameters that
    moved; with momentum almost all do).

    ``uncertain=True`` counts parameters whose |LCA| is within the iteration's ``error`` as ``uncertain``
    (see :meth:`LCAResult.fractions`) and adds ``mean_uncertain`` (over the iterations with an estimate).

    >>> import lca_notebook as lca
    >>> f = fractions(lca.LCAResult.example())
    >>> round(float(f["mean_helped"]), 3), f["helped"].dims
    (0.333, ('iteration',))
    """
    _check_by(by, ("total", "layer", "tensor", "unit"))
    ds = result.fractions(by=by, start=start, stop=stop, uncertain=uncertain)
    moving = (ds["helped"] + ds["hurt"]).sum("iteration")
    out = ds.assign(
        mean_helped=ds["helped"].mean("iteration"),
        mean_hurt=ds["hurt"].mean("iteration"),
        mean_zero=ds["zero"].mean("iteration"),
        helped_among_moving=(ds["helped"].sum("iteration") / moving.where(moving > 0)),
    )
    if uncertain:
        out["mean_uncertain"] = ds["uncertain"].mean("iteration")  # NaN iterations (no estimate) skipped
    out.attrs["by"] = by
    return out


def _helped_band(result: LCAResult) -> str:
    """How sure the fraction that helped is, from the result's per-iteration ``error``: a sentence."""
    err = np.asarray(result.error.values, dtype=np.float64)
    how = "analyze with method='adaptive' and param_tol=... for one"
    if err.size and np.isfinite(err).all() and result.keep != "parameter":
        return (
            f"no band from the error estimate: it needs each parameter's LCA, and this result was computed with "
            f"keep={result.keep!r}"
        )
    if err.size and np.isfinite(err).all():
        f = fractions(result, uncertain=True)
        low, high = float(f["mean_helped"]), float((f["helped"] + f["uncertain"]).mean("iteration"))
        return (
            f"with the quadrature's error estimate, {100 * low:.1f}%-{100 * high:.1f}% help ("
            f"{100 * float(f['mean_uncertain']):.2f}% of the parameters per iteration have |LCA| within the "
            "iteration's largest estimated error, a conservative band; a lower param_tol narrows it)"
        )
    if np.isfinite(err).any():
        return f"only {int(np.isfinite(err).sum())} of {err.size} iterations have an error estimate: {how}"
    method = result.attrs.get("method")
    why = (
        "every iteration met tol with one Simpson piece"
        if method == "adaptive"
        else f"method={method!r} computes one level per iteration"
    )
    return f"no per-parameter error estimate ({why}): {how}"


# -- layers -------------------------------------------------------------------------------------
def layer_totals(result: LCAResult, by: str = "layer", start: int | None = None, stop: int | None = None) -> xr.Dataset:
    """Total LCA of each layer over iterations ``[start, stop)``, whether it hurt, and its share of the loss change.

    Variables over ``by``: ``total`` (sum of LCA; < 0 helped), ``hurts`` (``total > 0``: the layer raised the
    loss overall), ``share`` (``total / loss_change``, where ``loss_change`` is the actual change of the
    full-data loss over the range: the shares of all layers sum to 1 up to ``lca_rest`` and the quadrature
    residual, both reported as scalars, so a layer that hurts has a negative share). Scalars:
    ``loss_change``, ``lca_rest``, ``residual``.

    >>> import lca_notebook as lca
    >>> t = layer_totals(lca.LCAResult.example())
    >>> t["total"].values.round(2).tolist(), t["hurts"].values.tolist()
    ([-0.45, 0.05], [False, True])
    """
    _check_by(by, ("layer", "tensor", "unit", "parameter"))
    start, stop = result._range(start, stop)
    total = result.total(by=by, start=start, stop=stop).rename("total")
    loss = np.asarray(result.loss.values, dtype=np.float64)
    change = float(loss[stop] - loss[start])
    rest = float(np.asarray(result.lca_rest.values[start:stop], dtype=np.float64).sum())
    residual = float(np.asarray(result.residual.values[start:stop], dtype=np.float64).sum())
    share = total / change if change != 0 else xr.full_like(total, np.nan)
    return xr.Dataset(
        {
            "total": total,
            "hurts": total > 0,
            "share": share.rename("share"),
            "loss_change": change,
            "lca_rest": rest,
            "residual": residual,
        },
        attrs={"by": by, "start": start, "stop": stop},
    )


def hurting_layers(
    result: LCAResult, by: str = "layer", start: int | None = None, stop: int | None = None
) -> list[str]:
    """Names of the layers whose total LCA is positive (they raised the loss overall), worst first.

    >>> import lca_notebook as lca
    >>> hurting_layers(lca.LCAResult.example())
    ['fc2']
    """
    t = layer_totals(result, by=by, start=start, stop=stop)["total"]
    hurt = t.where(t > 0, drop=True)
    order = np.argsort(-hurt.values, kind="stable")
    return [str(v) for v in hurt[by].values[order]]


# -- windows ------------------------------------------------------------------------------------
def per_window(
    result: LCAResult, by: str = "unit", windows: int = 20, layer: str | Sequence[str] | None = None
) -> xr.DataArray:
    """LCA summed over ``windows`` equal windows of iterations, at a granularity: ``(window, group)``.

    Each window is one subtraction of prefix sums, so this is cheap on long runs. ``layer=`` keeps the
    groups of those layers only (for ``by="unit"``: one row per neuron or channel). The ``window``
    coordinate carries ``start`` and ``stop`` iterations.

    >>> import lca_notebook as lca
    >>> per_window(lca.LCAResult.example(), by="layer", windows=3).values.round(2).tolist()
    [[-0.2, 0.0], [-0.15, 0.0], [-0.1, 0.05]]
    """
    _check_by(by, ("unit", "tensor", "layer", "parameter", "total"))
    t = result.n_iterations
    if not (isinstance(windows, int) and windows >= 1):
        raise ValueError(f"windows must be a positive int, got {windows!r}")
    windows = min(windows, max(t, 1))
    edges = np.unique(np.linspace(0, t, windows + 1).round().astype(int))
    result._needs(f"per_window(by={by!r})", by)
    p = result.prefix(by)
    rows = np.stack([np.asarray(p[e], dtype=np.float64) for e in edges])
    da = result._wrap(np.diff(rows, axis=0), by, iteration=np.arange(len(edges) - 1)).rename({"iteration": "window"})
    da = da.assign_coords(start=("window", edges[:-1]), stop=("window", edges[1:]))
    if layer is not None:
        if by == "total":
            raise ValueError(
                "layer= picks groups inside layers; with by='total' there is one group: use by='layer' instead"
            )
        layers = [layer] if isinstance(layer, str) else list(layer)
        known = set(result.layers)
        missing = [name for name in layers if name not in known]
        if missing:
            raise KeyError(f"no layer {missing[0]!r} in this result; it has: {', '.join(result.layers)}")
        if by == "layer":
            da = da.sel(layer=layers)
        elif "layer" in da.coords:
            da = da.isel({by: np.isin(da["layer"].values, layers)})
        else:  # tensor: its layer is the tensor name's owner
            layer_labels = result.groups.labels("layer")
            owner = layer_labels[result.groups.layer_of(by)]
            da = da.isel({by: np.flatnonzero(np.isin(owner, layers))})
    return da


# -- synchrony ----------------------------------------------------------------------------------
def peaks(learning: np.ndarray, quantile: float = 0.9) -> np.ndarray:
    """Learning peaks of each column of an ``(iteration, group)`` array of learning (``-LCA``): boolean, same shape.

    Iteration ``t`` is a peak of a column when its learning is positive, a local maximum (above the
    previous iteration, not below the next) and at least the column's ``quantile``.

    >>> peaks(np.array([[0.0], [1.0], [0.2], [0.9], [0.1]]), quantile=0.5)[:, 0].tolist()
    [False, True, False, True, False]
    """
    x = np.asarray(learning, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"learning must be (iteration, group), got shape {x.shape}")
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must be in [0, 1], got {quantile}")
    if x.shape[0] == 0:
        return np.zeros(x.shape, dtype=bool)
    left = np.vstack([np.full((1, x.shape[1]), -np.inf), x[:-1]])
    right = np.vstack([x[1:], np.full((1, x.shape[1]), -np.inf)])
    return (x > 0) & (x > left) & (x >= right) & (x >= np.quantile(x, quantile, axis=0))


def synchrony(
    result: LCAResult,
    *,
    by: str = "layer",
    quantile: float = 0.9,
    n_permutations: int = 1000,
    shuffle: str = "permute",
    seed: int = 0,
    start: int | None = None,
    stop: int | None = None,
) -> xr.Dataset:
    """Do layers learn on the same iterations? Peaks of each layer's learning, their coincidences, and a
    permutation test.

    Learning of a layer at an iteration is minus its summed LCA; its peaks are given by :func:`peaks`.
    The statistic is the number of coinciding pairs: the sum over iterations of ``k (k - 1) / 2`` where
    ``k`` layers peak on that iteration. The baseline shuffles each layer's peaks over the iterations
    independently (``shuffle="permute"``; ``"roll"``: a random circular shift per layer, which keeps
    the spacing of its peaks), ``n_permutations`` times with ``seed``. ``p_value`` is
    ``(1 + #{baseline >= statistic}) / (1 + n_permutations)``.

    Returns a Dataset: ``learning`` and ``peaks`` (iteration, group), ``n_peaks`` (group), ``coincidences``
    (group, ``other``: peaks shared by each pair), scalars ``statistic``, ``expected`` (baseline mean),
    ``p_value``, ``shared_fraction`` (fraction of all peaks on an iteration where another layer peaks too).

    >>> import lca_notebook as lca
    >>> s = synchrony(lca.LCAResult.example(), quantile=0.0, n_permutations=50)
    >>> int(s["statistic"]), s["peaks"].dims
    (0, ('iteration', 'layer'))
    """
    _check_by(by, ("layer", "tensor", "unit"))
    if shuffle not in ("permute", "roll"):
        raise ValueError(f"shuffle must be 'permute' or 'roll', got {shuffle!r}")
    if not (isinstance(n_permutations, int) and n_permutations >= 1):
        raise ValueError(f"n_permutations must be a positive int, got {n_permutations!r}")
    learning = -result.per_iteration(by=by, start=start, stop=stop)
    if learning.sizes[by] < 2:
        raise ValueError(f"synchrony needs at least two groups to compare; this result has {learning.sizes[by]} {by}")
    pk = peaks(learning.values, quantile)
    stat = _pairs(pk)
    rng = np.random.default_rng(seed)
    t = pk.shape[0]
    null = np.empty(n_permutations)
    for i in range(n_permutations):
        if shuffle == "permute":
            shuffled = rng.permuted(pk, axis=0)
        else:
            shifts = rng.integers(0, max(t, 1), size=pk.shape[1])
            shuffled = pk[(np.arange(t)[:, None] - shifts[None, :]) % max(t, 1), np.arange(pk.shape[1])]
        null[i] = _pairs(shuffled)
    k = pk.sum(axis=1)
    n_total = int(pk.sum())
    shared = float(pk[k >= 2].sum() / n_total) if n_total else float("nan")
    labels = learning[by].values
    co = pk.T.astype(np.int64) @ pk.astype(np.int64)
    return xr.Dataset(
        {
            "learning": learning.rename("learning"),
            "peaks": (("iteration", by), pk),
            "n_peaks": ((by,), pk.sum(axis=0)),
            "coincidences": ((by, "other"), co),
            "statistic": stat,
            "expected": float(null.mean()),
            "p_value": float((1 + (null >= stat).sum()) / (1 + n_permutations)),
            "shared_fraction": shared,
        },
        coords={"other": labels},
        attrs={"by": by, "quantile": quantile, "n_permutations": n_permutations, "shuffle": shuffle, "seed": seed},
    )


def _pairs(pk: np.ndarray) -> int:
    k = pk.sum(axis=1).astype(np.int64)
    return int((k * (k - 1) // 2).sum())


# -- oscillation --------------------------------------------------------------------------------
def oscillation(result: LCAResult, trajectory=None, *, by: str = "layer") -> xr.Dataset:
    """How often each layer's parameters change the sign of their LCA, and (given the trajectory) reverse direction.

    From the result alone: ``lca_flip_rate`` (group) is the fraction of consecutive iteration pairs, over
    the group's parameters, on which a parameter's LCA changes sign (pairs where either is exactly 0 are
    not counted); ``group_flip_rate`` is the same for the group's summed LCA (does the layer as a whole
    switch between helping and hurting?).

    With ``trajectory`` (the same T+1 snapshots given to ``analyze``; anything ``analyze`` accepts):
    ``reversal_rate`` (group) is the fraction of consecutive steps on which a parameter moves the
    opposite way, ``sign(theta[t+2] - theta[t+1]) != sign(theta[t+1] - theta[t])`` (steps of exactly 0
    not counted). Snapshots are read one at a time.

    Scalars ``all_lca_flip_rate`` and ``all_reversal_rate`` pool every parameter.

    >>> import lca_notebook as lca
    >>> o = oscillation(lca.LCAResult.example())
    >>> o["lca_flip_rate"].values.tolist()  # fc2's parameters never have two nonzero LCA in a row
    [0.0, nan]
    """
    _check_by(by, ("layer", "tensor", "unit", "parameter", "total"))
    result._needs("oscillation() (each parameter's LCA changing sign between iterations)")
    t, p = result.n_iterations, result.n_parameters
    flips = np.zeros(p)
    pairs = np.zeros(p)
    prev = None
    for _, block in _rows(result, 0, t):
        s = np.sign(block)
        full = s if prev is None else np.vstack([prev, s])
        prod = full[1:] * full[:-1]
        flips += (prod < 0).sum(axis=0)
        pairs += (prod != 0).sum(axis=0)
        prev = s[-1:]
    labels = _labels(result, by)
    g_flips, g_pairs = result.groups.sum(flips, by), result.groups.sum(pairs, by)
    rate = np.divide(g_flips, g_pairs, out=np.full(len(labels), np.nan), where=g_pairs > 0)
    if by == "parameter":  # a parameter is its own group; skip the (iteration, parameter) table
        group_rate = rate
    else:
        sums = np.sign(np.asarray(result.per_iteration(by=by).values))
        prod = sums[1:] * sums[:-1]
        gf, gp = (prod < 0).sum(axis=0), (prod != 0).sum(axis=0)
        group_rate = np.divide(gf, gp, out=np.full(len(labels), np.nan), where=gp > 0)
    coords = result._wrap(np.zeros(len(labels)), by).coords
    out = xr.Dataset(
        {
            "lca_flip_rate": ((by,), rate),
            "group_flip_rate": ((by,), group_rate),
            "all_lca_flip_rate": float(flips.sum() / pairs.sum()) if pairs.sum() else float("nan"),
        },
        coords=coords,
        attrs={"by": by},
    )
    if trajectory is not None:
        rev, moves = _reversals(result, trajectory)
        g_rev, g_moves = result.groups.sum(rev, by), result.groups.sum(moves, by)
        out["reversal_rate"] = ((by,), np.divide(g_rev, g_moves, out=np.full(len(labels), np.nan), where=g_moves > 0))
        out["all_reversal_rate"] = float(rev.sum() / moves.sum()) if moves.sum() else float("nan")
    return out


def _reversals(result: LCAResult, trajectory) -> tuple[np.ndarray, np.ndarray]:
    """Per parameter: number of direction reversals and of consecutive pairs of nonzero steps."""
    import torch

    traj = as_trajectory(trajectory)
    if len(traj) != result.n_iterations + 1:
        raise ValueError(
            f"the trajectory has {len(traj)} snapshots but the result has {result.n_iterations} iterations: "
            f"pass the same T+1 = {result.n_iterations + 1} snapshots that were given to analyze()"
        )
    ids, index = result.groups.ids("tensor"), result.groups.coords["index"]
    where = {name: np.flatnonzero(ids == i) for i, name in enumerate(result.groups.labels("tensor").tolist())}

    def flat(k: int) -> np.ndarray:
        snap = traj[k]
        out = np.empty(result.n_parameters)
        for name, pos in where.items():
            if name not in snap:
                raise KeyError(
                    f"{traj.describe(k)} has no tensor {name!r}, which the result has; pass the snapshots given to "
                    "analyze()"
                )
            v = snap[name].detach().reshape(-1).to("cpu", torch.float64).numpy()
            if index[pos].max(initial=-1) >= v.size:
                raise ValueError(
                    f"{name!r} in {traj.describe(k)} has {v.size} values, fewer than the result's; wrong trajectory?"
                )
            out[pos] = v[index[pos]]
        return out

    rev = np.zeros(result.n_parameters)
    moves = np.zeros(result.n_parameters)
    a = flat(0)
    prev_d = None
    for k in range(1, len(traj)):
        b = flat(k)
        d = np.sign(b - a)
        if prev_d is not None:
            prod = d * prev_d
            rev += prod < 0
            moves += prod != 0
        a, prev_d = b, d
    return rev, moves


# -- concentration ------------------------------------------------------------------------------
def gini(values) -> float:
    """Gini coefficient of non-negative values: 0 when all are equal, (n-1)/n when one holds everything.

    >>> gini([1, 1, 1, 1]), gini([0, 0, 0, 4])
    (0.0, 0.75)
    """
    x = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if x.size == 0:
        return float("nan")
    if (x < 0).any():
        raise ValueError("gini needs non-negative values (take the helped part or |LCA| first)")
    total = x.sum()
    if total == 0:
        return 0.0
    n = x.size
    return float(2.0 * np.dot(np.arange(1, n + 1), x) / (n * total) - (n + 1) / n)


def _fraction_for(x: np.ndarray, share: float) -> float:
    """Smallest fraction of the entries whose largest values add up to ``share`` of the total."""
    x = np.sort(np.asarray(x, dtype=np.float64))[::-1]
    total = x.sum()
    if x.size == 0 or total == 0:
        return float("nan")
    k = int(np.searchsorted(np.cumsum(x), share * total * (1 - 1e-12))) + 1
    return min(k, x.size) / x.size


def concentration(
    result: LCAResult, *, of: str = "helped", share: float = 0.9, start: int | None = None, stop: int | None = None
) -> xr.Dataset:
    """How few parameters do the learning: Gini coefficient of per-parameter total LCA, and the fraction
    carrying ``share`` of it.

    ``of="helped"`` (default) takes each parameter's learning, ``max(-total LCA, 0)``: a parameter that
    hurt overall did no learning, and the paper's question is who lowered the loss. ``of="abs"`` takes
    ``|total LCA|`` (who moved the loss either way). Returns scalars ``gini`` and ``fraction`` (smallest
    fraction of parameters whose contributions add up to ``share`` of the sum), and the same per layer
    (``layer_gini``, ``layer_fraction``).

    >>> import lca_notebook as lca
    >>> c = concentration(lca.LCAResult.example())
    >>> round(float(c["gini"]), 3), round(float(c["fraction"]), 3)
    (0.628, 0.333)
    """
    if of not in ("helped", "abs"):
        raise ValueError(f"of must be 'helped' or 'abs', got {of!r}")
    if not 0.0 < share <= 1.0:
        raise ValueError(f"share must be in (0, 1], got {share}")
    total = np.asarray(result.total(by="parameter", start=start, stop=stop).values, dtype=np.float64)
    x = np.maximum(-total, 0.0) if of == "helped" else np.abs(total)
    layer = result.groups.ids("layer")
    names = result.layers
    return xr.Dataset(
        {
            "gini": gini(x),
            "fraction": _fraction_for(x, share),
            "layer_gini": (("layer",), [gini(x[layer == i]) for i in range(len(names))]),
            "layer_fraction": (("layer",), [_fraction_for(x[layer == i], share) for i in range(len(names))]),
        },
        coords={"layer": names},
        attrs={"of": of, "share": share},
    )


# -- accuracy of the rules ----------------------------------------------------------------------
def residual_table(results: Mapping[str, LCAResult]) -> xr.Dataset:
    """Residuals of several results of the same trajectory (one per rule), side by side in one Dataset.

    Dims are ``(rule, iteration)`` (``rule``, not ``method``: xarray's ``.sel(method=)`` is taken).

    Variables: ``residual`` and ``drift`` (cumulative residual: how far the loss rebuilt from LCA is from
    the true loss) over (rule, iteration); ``evaluations`` (gradient evaluations) likewise; and per
    rule ``max_abs_residual``, ``mean_abs_residual``, ``final_drift``, ``relative_drift`` (final drift /
    |true loss change|), ``total_evaluations`` (the run's gradient evaluations, ``attrs["gradient_evaluations"]``:
    the first snapshot's included, so Simpson's is 2T+1; the sum of ``evaluations`` where a result has no such
    attribute).

    >>> import lca_notebook as lca
    >>> r = lca.LCAResult.example()
    >>> residual_table({"a": r, "b": r})["max_abs_residual"].dims
    ('rule',)
    """
    if not results:
        raise ValueError("results is empty: pass {method name: LCAResult}")
    names = list(results)
    lengths = {n: results[n].n_iterations for n in names}
    if len(set(lengths.values())) != 1:
        raise ValueError(
            f"the results cover different numbers of iterations ({lengths}); compare results of the same trajectory"
        )
    res = np.stack([np.asarray(results[n].residual.values, dtype=np.float64) for n in names])
    evals = np.stack(
        [
            np.asarray(results[n].dataset["evaluations"].values)
            if "evaluations" in results[n].dataset
            else np.zeros(res.shape[1])
            for n in names
        ]
    )
    loss = np.asarray(results[names[0]].loss.values, dtype=np.float64)
    change = abs(loss[-1] - loss[0]) if loss.size else float("nan")
    drift = np.cumsum(res, axis=1)
    final = drift[:, -1] if drift.shape[1] else np.zeros(len(names))
    it = np.arange(res.shape[1])
    per_run = evals.sum(axis=1)
    totals = [results[n].attrs.get("gradient_evaluations", e) for n, e in zip(names, per_run, strict=True)]
    return xr.Dataset(
        {
            "residual": (("rule", "iteration"), res),
            "drift": (("rule", "iteration"), drift),
            "evaluations": (("rule", "iteration"), evals),
            "max_abs_residual": (("rule",), np.abs(res).max(axis=1, initial=0.0)),
            "mean_abs_residual": (("rule",), np.abs(res).mean(axis=1) if res.shape[1] else np.zeros(len(names))),
            "final_drift": (("rule",), final),
            "relative_drift": (("rule",), np.abs(final) / change if change else np.full(len(names), np.nan)),
            "total_evaluations": (("rule",), np.array(totals, dtype=np.int64)),
        },
        coords={"rule": names, "iteration": it},
    )


def rule_accuracy(
    model, data, trajectory, *, methods: Sequence[str] = RULES, return_results: bool = False, **analyze_kwargs
):
    """Run ``analyze`` once per quadrature rule on the same trajectory and compare their residuals (see
    :func:`residual_table`).

    ``analyze_kwargs`` (``tol``, ``max_splits``, ``loss_fn``, ``batch_size``, ...) go to every call.
    With ``return_results=True`` returns ``(table, {method: LCAResult})``. The trajectory must be
    re-readable (a list, a directory of checkpoints, a store), not a one-shot iterator.

    >>> import torch, lca_notebook as lca
    >>> from lca_notebook import models
    >>> x, y = models.digits_data()
    >>> m = torch.nn.Linear(64, 10)
    >>> snaps = models.train(m, (x, y), steps=4)
    >>> t = rule_accuracy(m, (x, y), snaps, progress=False)
    >>> bool(t["max_abs_residual"].sel(rule="simpson") < t["max_abs_residual"].sel(rule="first_order"))
    True
    """
    analyze_kwargs.setdefault("progress", False)
    if hasattr(trajectory, "__next__"):  # a one-shot iterator: every rule must read the same snapshots
        trajectory = list(trajectory)
    results = {m: analyze(model, data, trajectory, method=m, **analyze_kwargs) for m in methods}
    table = residual_table(results)
    return (table, results) if return_results else table


# -- all findings in one table ------------------------------------------------------------------
@dataclass
class Finding:
    """One of the paper's findings beside what this run shows."""

    name: str
    paper: str
    this_run: str


class Findings(list):
    """A list of :class:`Finding` that shows as a table in Jupyter."""

    def _repr_html_(self) -> str:
        import html

        rows = "".join(
            f"<tr><td><b>{html.escape(f.name)}</b></td><td>{html.escape(f.paper)}</td><td>{html.escape(f.this_run)}</td></tr>"
            for f in self
        )
        return (
            "<table><thead><tr><th style='text-align:left'>finding</th><th style='text-align:left'>the paper</th>"
            f"<th style='text-align:left'>this run</th></tr></thead><tbody>{rows}</tbody></table>"
        )

    def __str__(self) -> str:
        return "\n".join(f"- {f.name}\n    paper:    {f.paper}\n    this run: {f.this_run}" for f in self)

    __repr__ = __str__


def findings(result: LCAResult, trajectory=None, *, rules: xr.Dataset | None = None, seed: int = 0) -> Findings:
    """Every finding of the paper measured on one result, beside the paper's statement.

    ``trajectory`` adds direction reversals to the oscillation finding; ``rules`` (a table from
    :func:`rule_accuracy`) adds the accuracy finding. When every iteration has an ``error`` estimate
    (``analyze(..., param_tol=...)``), the fraction that helped comes with its band (see
    :func:`fractions` with ``uncertain=True``): one more pass over ``lca``.

    >>> import lca_notebook as lca
    >>> f = findings(lca.LCAResult.example())
    >>> [x.name for x in f][:2]
    ['helping parameters', 'layers that hurt']
    """
    out = Findings()
    fr = fractions(result)
    out.append(
        Finding(
            "helping parameters",
            "barely over 50% of parameters help on any given iteration",
            f"{100 * float(fr['mean_helped']):.1f}% help on average "
            f"({100 * float(fr['helped_among_moving']):.1f}% of those that moved); "
            f"range over iterations {100 * float(fr['helped'].min()):.1f}%-{100 * float(fr['helped'].max()):.1f}%; "
            + _helped_band(result),
        )
    )
    lt = layer_totals(result)
    hurting = hurting_layers(result)
    shares = ", ".join(
        f"{name} {100 * float(s):+.0f}%" for name, s in zip(lt["layer"].values, lt["share"].values, strict=False)
    )
    out.append(
        Finding(
            "layers that hurt",
            "some entire layers hurt overall (ResNet on CIFAR-10: the first and last layers)",
            (f"{', '.join(hurting)} hurt overall" if hurting else "no layer hurt overall")
            + f"; shares of the loss change: {shares}",
        )
    )
    if len(result.layers) >= 2 and result.n_iterations >= 3:
        s = synchrony(result, seed=seed)
        out.append(
            Finding(
                "synchrony",
                "learning is synchronised across layers, often peaking on the same iterations",
                f"{int(s['statistic'])} coinciding layer-pairs of peaks vs {float(s['expected']):.1f} expected with "
                f"iterations shuffled per layer (p = {float(s['p_value']):.3g}); "
                f"{100 * float(s['shared_fraction']):.0f}% of peaks are shared with another layer",
            )
        )
    if result.n_iterations < 2:
        text = "not measured: a change of sign needs two iterations or more, and this run has one"
    elif result.keep == "parameter":
        o = oscillation(result, trajectory)
        text = f"parameters' LCA changes sign on {100 * float(o['all_lca_flip_rate']):.0f}% of consecutive iterations"
        if "all_reversal_rate" in o:
            text += f"; parameters reverse direction on {100 * float(o['all_reversal_rate']):.0f}% of steps"
    else:
        text = (
            f"not measured: sign changes need each parameter's LCA at each iteration, and this result was computed "
            f"with keep={result.keep!r} (analyze(..., keep='parameter') keeps it)"
        )
    out.append(Finding("oscillation", "training oscillates: parameters and gradients switch direction often", text))
    c = concentration(result)
    out.append(
        Finding(
            "concentration",
            "(not a headline of the paper) how unevenly learning is spread over parameters",
            f"Gini {float(c['gini']):.2f} of per-parameter learning; {100 * float(c['fraction']):.1f}% of parameters "
            "carry 90% of it",
        )
    )
    if rules is not None:
        mx = rules["max_abs_residual"]
        drift = rules["relative_drift"]
        parts = [
            f"{m}: max |residual| {float(mx.sel(rule=m)):.1e}, drift {100 * float(drift.sel(rule=m)):.1f}% of the loss "
            "change"
            for m in rules["rule"].values
        ]
        out.append(
            Finding(
                "accuracy of the rules",
                "first-order LCA drifts far from the true loss; Runge-Kutta (Simpson) stays within tolerance",
                "; ".join(parts),
            )
        )
    return out
