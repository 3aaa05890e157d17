"""The LCA explorer: one ipywidgets panel of controls and bqplot figures over an ``LCAResult``.

Everything a figure shows is a sum of prefix sums, reduced in Python to about the figure's pixel width
and sent as float32; a control change updates the marks' data in place under ``hold_sync()`` and sends
only the traits that changed. What needs a pass over (iteration, parameter) is done once, at construction,
in a single pass.

Tooltips are HTML the kernel fills on hover: every series at the pointer on the loss and cumulative charts
(through invisible full-height columns), each layer's sums and share of the loss change on the bars, the
bin on the histogram. bqplot 0.13's canvas ``HeatMap`` binds no data to its image and so reports no cell
under the pointer; an invisible grid of squares over it does, and the tooltip names the cell (row,
iterations) and its LCA. The fractions chart shows the whole run: a drag on it sets the range
(``BrushIntervalSelector``, linked both ways to the slider).

>>> import lca_notebook as lca
>>> ex = lca.explore(lca.LCAResult.example())
>>> ex.range.value = (1, 3)
>>> ex.marks["helped_bars"].y.astype(float).round(3).tolist()  # fc1, fc2 over iterations 1..2
[-0.3, 0.0]
>>> ex.marks["hurt_bars"].y.astype(float).round(3).tolist()
[0.05, 0.05]
"""

from __future__ import annotations

import html
import os
import threading
import time
from contextlib import ExitStack

import ipywidgets as widgets
import numpy as np
import xarray as xr

from ..result import LCAResult, ReducedResultError, saved_kind
from ..storage.files import local_path
from . import figures
from .reduce import (
    ParameterRanges,
    bin_centres,
    bin_edges,
    binned_mean,
    binned_sum,
    group_rows,
    trailing_mean,
    with_prefix,
)

#: Granularities the explorer offers, as (button label, ``by=`` value).
GRANULARITIES = (
    ("parameter", "parameter"),
    ("unit (neuron / channel)", "unit"),
    ("tensor", "tensor"),
    ("layer", "layer"),
)
SIGNS = ("both", "helped", "hurt")
TAIL = 0.5  # percent of the histogram's values at each end counted in its end bins
ALL_LAYERS = "(all layers)"


class Explorer(widgets.VBox):
    """Interactive view of an ``LCAResult``: controls on top, linked figures, export at the bottom.

    The controls are ``range`` (iterations ``[start, stop)``; a drag on the fractions chart sets it too),
    ``granularity`` (the finest the result keeps by default), ``layer`` (``None`` for all layers), ``sign``,
    ``smoothing`` (trailing mean of the fractions and the residual) and ``log_count`` (the histogram's count
    axis); set their ``.value`` from
    Python or use them in the page. ``marks`` maps names to the bqplot marks, ``figures`` names to figures,
    :meth:`selection` gives what is on screen as an ``xarray.Dataset`` and :meth:`export` writes it (CSV,
    netCDF) or the figures (PNG, SVG). Figures fill the width they are given (two columns from about 900 px);
    ``width`` is about one plot's pixel width, the most points a line sends (``max_points`` overrides it).

    Edges draw or say what is wrong: a zero-width range keeps the last drawing and says so; NaN or inf in
    ``lca`` are drawn as 0 and named in the summary (count, first iteration and parameter); a result without
    iterations or parameters is refused with the reason.

    >>> import lca_notebook as lca
    >>> ex = lca.explore(lca.LCAResult.example(), granularity="unit")
    >>> ex.layer.value = "fc1"; ex.selection()["lca"].values.round(3).tolist()  # fc1's two neurons
    [-0.3, -0.15]
    """

    def __init__(
        self,
        result,
        *,
        granularity: str | None = None,
        layer: str | None = None,
        sign: str = "both",
        smoothing: int = 1,
        log_count: bool = False,
        width: int = 560,
        height: int = 270,
        max_points: int | None = None,
        heatmap_columns: int | None = None,
        heatmap_rows: int = 128,
        histogram_bins: int = 40,
        parameter_budget_bytes: int = 64 << 20,
    ):
        if not isinstance(result, LCAResult):
            hint = ": wrap it, lca.LCAResult(dataset)" if isinstance(result, xr.Dataset) else ""
            raise TypeError(
                f"explore needs an LCAResult (from lca.analyze or lca.open) or a result store's path, got a "
                f"{type(result).__name__}{hint}"
            )
        if granularity is not None and granularity not in (bys := [by for _, by in GRANULARITIES]):
            raise ValueError(f"granularity must be one of {', '.join(bys)}, got {granularity!r}")
        if sign not in SIGNS:
            raise ValueError(f"sign must be one of {', '.join(SIGNS)}, got {sign!r}")
        self.result = result
        r = result
        t = r.n_iterations
        if t < 1:
            raise ValueError(
                f"the result has {t} iterations; the explorer needs at least one (analyze at least 2 snapshots)"
            )
        if r.n_parameters < 1:
            raise ValueError(
                "the result has no parameters (its `lca` has 0 columns), so there is nothing to explore: analyze a "
                "model with at least one trainable tensor (or pass parameters= naming one)"
            )
        self.n_iterations = t
        self.max_points = int(max_points or width)  # about one point per pixel of plot width
        self.heatmap_columns = int(heatmap_columns or max(2, width // 2))
        self.heatmap_rows, self.histogram_bins = int(heatmap_rows), int(histogram_bins)
        self.notes: list[str] = []  # what the summary must always say (non-finite values left out, ...)
        self._parameter_budget = parameter_budget_bytes
        self._refresh_lock = threading.RLock()
        self._precompute(parameter_budget_bytes)

        # -- controls ---------------------------------------------------------------------------
        label_style = {"description_width": "72px"}
        self.range = widgets.IntRangeSlider(
            value=(0, t),
            min=0,
            max=t,
            step=1,
            description="iterations",
            continuous_update=True,
            layout=widgets.Layout(flex="3 1 380px", min_width="300px"),
            style=label_style,
        )
        self.smoothing = widgets.IntSlider(
            value=smoothing,
            min=1,
            max=max(1, min(500, t)),
            description="smoothing",
            tooltip="trailing mean over this many iterations of the fractions and the residual",
            continuous_update=True,
            layout=widgets.Layout(flex="1 1 260px", min_width="240px"),
            style=label_style,
        )
        offered = [
            (label, by) for label, by in GRANULARITIES if (by == "parameter" and self.keep == by) or by in self._prefix
        ]
        tips = {"parameter": "each scalar parameter", "unit": "each output neuron or channel", "tensor": "each tensor"}
        if granularity is not None and granularity not in (kept_bys := [by for _, by in offered]):
            raise ValueError(
                f"granularity={granularity!r} is finer than this result keeps (analyze(keep={self.keep!r})): choose "
                f"{', '.join(kept_bys)}, or compute it again with a finer keep="
            )
        self.granularity = widgets.ToggleButtons(
            options=offered,
            value=offered[0][1] if granularity is None else granularity,  # the finest kept by default
            style={"button_width": "auto"},
            tooltips=[tips.get(by, "each layer") for _, by in offered],
        )
        if layer is not None and layer not in self.layers:
            raise ValueError(f"layer {layer!r} is not one of the result's layers: {', '.join(self.layers)}")
        # values are strings: a Dropdown treats None as "nothing selected" and shows a blank box
        self.layer = widgets.Dropdown(
            options=[ALL_LAYERS, *self.layers],
            value=layer or ALL_LAYERS,
            description="layer",
            style=label_style,
            layout=widgets.Layout(width="280px"),
        )
        self.sign = widgets.ToggleButtons(options=list(SIGNS), value=sign, style={"button_width": "76px"})
        self.log_count = widgets.Checkbox(
            value=bool(log_count), description="log count (histogram)", indent=False, layout={"width": "auto"}
        )
        self.summary = widgets.HTML(layout=widgets.Layout(height="64px", overflow="hidden", width="100%"))
        self.summary.add_class("lca-summary-box")

        # -- figures ----------------------------------------------------------------------------
        h = int(height)
        loss_fig, loss_marks = figures.loss_figure(h - 100)
        residual_fig, residual_marks = figures.residual_figure(100, loss_marks["loss"].scales["x"])
        built = {
            "loss": (loss_fig, loss_marks),
            "residual": (residual_fig, residual_marks),
            "fractions": figures.fractions_figure(h),
            "cumulative": figures.cumulative_figure(h, self.layers),
            "layers": figures.layer_bars_figure(h, self.layers),
            "heatmap": figures.heatmap_figure(h + 56),
            "histogram": figures.histogram_figure(h + 56),
        }
        self.figures = {k: f for k, (f, _) in built.items()}
        self.marks = {name: m for _, ms in built.values() for name, m in ms.items() if not name.startswith("_")}
        self._linear_count, self._log_count_scale = (
            self.marks["histogram_helped"].scales["y"],
            built["histogram"][1]["_log_scale"],
        )
        self.brush = self.marks.pop("brush")
        for name, fig in self.figures.items():
            fig.add_class(f"lca-figure-{name}")
        loss_panel = widgets.VBox([loss_fig, residual_fig], layout=widgets.Layout(width="100%"))
        loss_panel.add_class("lca-loss-panel")

        # -- export -----------------------------------------------------------------------------
        self.export_path = widgets.Text(
            value="lca_selection.csv",
            description="export to",
            placeholder="file.csv, .nc, .png or .svg",
            style=label_style,
            layout=widgets.Layout(width="380px"),
        )
        self.export_button = widgets.Button(
            description="Export", icon="download", tooltip="Write the selection (.csv, .nc) or the figures (.png, .svg)"
        )
        self.export_status = widgets.HTML()
        self.export_status.add_class("lca-export-status")
        self.export_button.on_click(lambda _: self._export_clicked())
        self._confirmed: str | None = None  # the existing file a second click on Export replaces

        cells = [loss_panel] + [self.figures[k] for k in ("fractions", "cumulative", "layers", "heatmap", "histogram")]
        grid = widgets.GridBox(
            cells,
            layout=widgets.Layout(
                grid_template_columns="repeat(auto-fill, minmax(440px, 1fr))", grid_gap="6px 10px", width="100%"
            ),
        )
        row = {"flex_flow": "row wrap", "align_items": "center", "width": "100%"}
        super().__init__(
            [
                widgets.HBox([self.range, self.smoothing], layout=widgets.Layout(**row)),
                widgets.HBox([_label("sum by"), self.granularity], layout=widgets.Layout(**row)),
                widgets.HBox(
                    [self.layer, _label("show"), self.sign, self.log_count],
                    layout=widgets.Layout(grid_gap="0 12px", **row),
                ),
                self.summary,
                grid,
                widgets.HBox([self.export_path, self.export_button, self.export_status], layout=widgets.Layout(**row)),
            ],
            layout=widgets.Layout(width="100%"),
        )
        self.add_class("lca-explorer")

        self._syncing = False
        self._from_brush = False
        self._fraction_key: tuple | None = None
        for control in (self.range, self.granularity, self.layer, self.sign, self.smoothing, self.log_count):
            control.observe(self._on_control, names="value")
        for key in ("helped_bars", "hurt_bars"):
            self.marks[key].observe(self._on_bar_selected, names="selected")
            self.marks[key].on_hover(self._on_bar_hover)
        self.brush.observe(self._on_brush, names=["selected", "brushing"])
        self.marks["hover"].on_hover(self._on_loss_hover)
        self.marks["cumulative_hover"].on_hover(self._on_cumulative_hover)
        self.marks["heatmap_hover"].on_hover(self._on_heatmap_hover)
        for key in ("histogram_helped", "histogram_hurt"):
            self.marks[key].on_hover(self._on_histogram_hover)
        _put(self.figures["fractions"].axes[0], "tick_values", _x_ticks(0, t))
        fx = self.figures["fractions"].marks[0].scales["x"]
        fx.min, fx.max = 0.0, float(t)
        self.update()

    # -- following a store that grows (analyze(..., follow=True)) -----------------------------------
    def refresh(self) -> bool:
        """Re-read the result store this explorer shows (one that ``analyze(..., follow=True)`` is still
        filling) and extend the range and every figure in place; True when there were new iterations.

        The user's selection is kept: a range that ended at the newest iteration follows it, any other stays
        as it is. A store caught mid-growth is read again at the next refresh."""
        from ..storage.results import open_store

        path = self.result.dataset.encoding.get("source")
        if path is None:
            return False
        with self._refresh_lock:
            try:
                new = open_store(path)
            except Exception:  # the store mid-growth (arrays resized one after another): next time
                return False
            t_old, t = self.n_iterations, new.n_iterations
            if t <= t_old:
                return False
            start, stop = self.range.value
            self.result, self.n_iterations = new, t
            self._precompute(self._parameter_budget)
            controls = (self.range, self.smoothing)
            for control in controls:  # one redraw below, not one per trait
                control.unobserve(self._on_control, names="value")
            try:
                self.range.max = t
                self.range.value = (start, t if stop == t_old else stop)
                self.smoothing.max = max(1, min(500, t))
            finally:
                for control in controls:
                    control.observe(self._on_control, names="value")
            _put(self.figures["fractions"].axes[0], "tick_values", _x_ticks(0, t))
            fx = self.figures["fractions"].marks[0].scales["x"]
            fx.min, fx.max = 0.0, float(t)
            self.update()
            return True

    def follow(self, interval: float = 1.0) -> Explorer:
        """Refresh every ``interval`` seconds, in a background thread (a training loop in the same cell keeps
        the kernel's event loop busy, so a timer there would never fire), until the store is complete or
        :meth:`stop_following`. ``lca.explore(path, follow=True)`` calls it."""
        from ..storage.files import read_attrs

        self.stop_following()
        path = self.result.dataset.encoding.get("source")
        if path is None:
            raise ValueError("follow=True re-reads a result store: give lca.explore a store path (or its result)")
        if not os.path.isdir(path):
            raise ValueError(
                f"follow=True re-reads a result store that analyze(store=..., follow=True) is filling; {path} is a "
                "saved file, which does not grow: leave out follow=True"
            )
        stop = self._follow_stop = threading.Event()

        def loop():
            took = 0.0
            while not stop.wait(max(interval, 2 * took)):  # a slow redraw never takes more than a third of the time
                try:  # a store being computed says complete: false; a saved one holds no such attribute
                    complete = read_attrs(path).get("complete") is not False
                except Exception:  # caught mid-write: look again
                    complete = False
                t0 = time.perf_counter()
                self.refresh()
                took = time.perf_counter() - t0
                if complete:
                    self.refresh()  # what completed it
                    return

        self._follow_thread = threading.Thread(target=loop, name="lca-explorer-follow", daemon=True)
        self._follow_thread.start()
        return self

    def stop_following(self):
        """Stop :meth:`follow` (a no-op when not following)."""
        stop = getattr(self, "_follow_stop", None)
        if stop is not None:
            stop.set()

    @property
    def following(self) -> bool:
        thread = getattr(self, "_follow_thread", None)
        return thread is not None and thread.is_alive()

    # -- precomputation (once) ------------------------------------------------------------------
    def _precompute(self, budget):
        r = self.result
        self.notes = []  # made again at each refresh: said once
        groups = r.groups
        self.layers = [str(x) for x in groups.labels("layer")]
        n_layers = len(self.layers)
        self._loss = np.asarray(r.loss.values, dtype=np.float64)
        self._residual = np.asarray(r.residual.values, dtype=np.float64)
        self._rest = np.asarray(r.lca_rest.values, dtype=np.float64)
        self._tol = _tolerance(r.attrs)
        self.keep = str(getattr(r, "keep", "parameter"))

        # element -> layer, labels and per-layer counts at each granularity
        self._labels, self._elem_layer, self._prefix = {}, {}, {}
        for by in ("parameter", "unit", "tensor", "layer"):
            self._labels[by], self._elem_layer[by] = np.asarray(groups.labels(by)), groups.layer_of(by)
        self._units_of_layer = groups.unit_coords()["unit_index"]
        self._n_elements = {"parameter": groups.sizes("layer").astype(np.float64)}  # from runs, not P ids
        for by in ("unit", "tensor", "layer"):
            self._n_elements[by] = np.bincount(self._elem_layer[by], minlength=n_layers).astype(np.float64)
        # each layer's parameter columns: a slice where contiguous (cheap to read), else an index array
        self._columns = groups.columns("layer")

        # per-iteration counts of helping / hurting elements per layer, at each granularity
        t = r.n_iterations
        helped = {"parameter": np.zeros((t, n_layers))}
        hurt = {"parameter": np.zeros((t, n_layers))}

        order = [by for _, by in GRANULARITIES]
        coarse = tuple(by for by in ("unit", "tensor", "layer") if order.index(by) >= order.index(self.keep))
        if self.keep == "parameter":
            self._scan_parameters(r, groups, coarse, helped, hurt, budget)
        else:  # a reduced result (analyze(keep=...)): per-iteration sums by keep and coarser only
            self._parameters: ParameterRanges | None = None
            del helped["parameter"], hurt["parameter"]
            for by in coarse:
                prefix = np.asarray(r.prefix(by), dtype=np.float64)
                if not np.isfinite(prefix).all():
                    per = np.diff(prefix, axis=0)
                    bad = ~np.isfinite(per)
                    self.notes.append(
                        f"the sums by {by} hold {int(bad.sum()):,} NaN or infinite values (first at iteration "
                        f"{int(np.argwhere(bad)[0][0])}); they are drawn as 0 and left out of every sum."
                    )
                    prefix = np.concatenate([np.zeros((1, per.shape[1])), np.cumsum(np.where(bad, 0.0, per), axis=0)])
                self._prefix[by] = prefix
            self.notes.append(
                f"This result keeps sums by {self.keep} (analyze(keep={self.keep!r})): finer views are not offered."
            )
        # the loss rebuilt from the first loss plus cumulative LCA (parameters and lca_rest), as the result's own
        # reconstructed_loss, from the prefix already at hand
        rest = np.concatenate([[0.0], np.cumsum(np.nan_to_num(self._rest, posinf=0.0, neginf=0.0))])
        rebuilt = self._loss[0] + self._prefix["layer"].sum(axis=1) + rest
        self._reconstructed = rebuilt
        for name, series in (("loss", self._loss), ("residual", self._residual)):
            bad = ~np.isfinite(series)
            if bad.any():
                self.notes.append(
                    f"{name} is NaN or infinite at {int(bad.sum())} of {len(series)} points (first at "
                    f"{int(np.flatnonzero(bad)[0])}): gaps in its line."
                )
        self._residual_finite = np.where(np.isfinite(self._residual), self._residual, 0.0)
        for by in coarse:
            per = np.diff(self._prefix[by], axis=0)
            onehot = np.zeros((per.shape[1], n_layers))
            onehot[np.arange(per.shape[1]), self._elem_layer[by]] = 1.0
            helped[by], hurt[by] = (per < 0) @ onehot, (per > 0) @ onehot
        self._helped_counts, self._hurt_counts = helped, hurt

    def _scan_parameters(self, r, groups, coarse, helped, hurt, budget):
        """One pass over (iteration, parameter): the strided parameter prefix, helped / hurt counts per layer and
        (for an in-memory result) the group sums; NaN and inf read as 0 and named."""
        t = r.n_iterations
        stored = all(f"prefix_{by}" in r.dataset for by in coarse)  # else summed here, in the same pass
        per_iteration = {} if stored else {by: np.zeros((t + 1, len(groups.labels(by)))) for by in coarse}

        def count(t0, block):  # folded into the single pass that builds the parameter prefix
            rows = slice(t0, t0 + len(block))
            for i, cols in enumerate(self._columns):
                part = block[:, cols]
                helped["parameter"][rows, i] = np.count_nonzero(part < 0, axis=1)
                hurt["parameter"][rows, i] = np.count_nonzero(part > 0, axis=1)
            for by, sums in groups.sums(block, per_iteration).items():
                per_iteration[by][t0 + 1 : t0 + 1 + len(sums)] = sums

        lca = r.lca.data if isinstance(r.lca.data, np.ndarray) else r.lca
        self._parameters = ParameterRanges(lca, budget_bytes=budget, on_block=count)
        if np.isfinite(self._parameters.total(0, t)).all():  # a NaN or inf anywhere shows in its column's sum
            for by in coarse:
                self._prefix[by] = (
                    np.asarray(r.prefix(by), dtype=np.float64) if stored else np.cumsum(per_iteration[by], axis=0)
                )
        else:  # read again with them as 0 and say so: the rest of the run is still worth seeing
            finite = _Finite(lca)
            self._prefix = finite.group_prefixes(groups, coarse)
            self._parameters = ParameterRanges(finite, budget_bytes=budget, on_block=count)
            it, col = finite.first_bad
            tensor, index = r.groups.coords["tensor"][col], r.groups.coords["index"][col]
            self.notes.append(
                f"lca holds {finite.n_bad:,} NaN or infinite values (first: iteration {it}, "
                f"{tensor}[{index}]); they are drawn as 0 and left out of every sum. "
                "Look for the iteration where the loss or the parameters diverged."
            )

    # -- the selection -----------------------------------------------------------------------------
    @property
    def selected_layer(self) -> int | None:
        """Index of the chosen layer, None for all layers."""
        return None if self.layer.value in (None, ALL_LAYERS) else self.layers.index(self.layer.value)

    def element_totals(self, by: str | None = None, start: int | None = None, stop: int | None = None) -> np.ndarray:
        """LCA summed over iterations ``[start, stop)`` of every element at a granularity (all layers)."""
        by = by or self.granularity.value
        if start is None or stop is None:
            start, stop = self.range.value
        if by == "parameter":
            if self._parameters is None:
                raise ValueError(
                    f"this result keeps sums by {self.keep} (analyze(keep={self.keep!r})): no per-parameter totals "
                    f"over a range; use by={self.keep!r} or coarser"
                )
            return self._parameters.total(start, stop)
        p = self._prefix[by]
        return p[stop] - p[start]

    def _selected_elements(self, totals, by):
        """(mask of the elements in the chosen layer and sign, their totals)."""
        mask = np.ones(len(totals), dtype=bool)
        if self.selected_layer is not None:
            mask &= self._elem_layer[by] == self.selected_layer
        if self.sign.value == "helped":
            mask &= totals < 0
        elif self.sign.value == "hurt":
            mask &= totals > 0
        return mask

    def fraction_series(self, by: str | None = None) -> dict:
        """Per-iteration fractions (helped, hurt, zero) overall or of the chosen layer, smoothed."""
        by = by or self.granularity.value
        layer = self.selected_layer
        h, u, n = self._helped_counts[by], self._hurt_counts[by], self._n_elements[by]
        if layer is None:
            helped, hurt, count = h.sum(axis=1), u.sum(axis=1), n.sum()
        else:
            helped, hurt, count = h[:, layer], u[:, layer], n[layer]
        count = max(float(count), 1.0)
        helped, hurt = helped / count, hurt / count
        out = {"helped": helped, "hurt": hurt, "zero": 1.0 - helped - hurt}
        return {k: trailing_mean(v, self.smoothing.value) for k, v in out.items()}

    def residual_series(self) -> np.ndarray:
        """The residual of each iteration, smoothed like the fractions (NaN where it was not finite)."""
        smoothed = trailing_mean(self._residual_finite, self.smoothing.value)
        return np.where(np.isfinite(self._residual), smoothed, np.nan)

    def compute(self) -> dict:
        """Everything the figures show for the current control values, as float64 arrays (not yet sent)."""
        start, stop = self.range.value
        by = self.granularity.value
        layer = self.selected_layer
        sign = self.sign.value
        edges = bin_edges(start, stop, self.max_points)
        out: dict = {"start": start, "stop": stop, "edges": edges}
        # loss: the checkpoints at the bin edges (exact values there)
        out["loss"] = (edges.astype(np.float64), self._loss[edges])
        out["reconstructed"] = (edges.astype(np.float64), self._reconstructed[edges])
        # residual: per iteration (smoothed); per bin, the iteration of largest |value| (a tolerance check)
        res = self.residual_series()
        out["residual"] = _extreme_per_bin(res, edges)
        # fractions over the whole run (the overview the brush selects on)
        fedges = bin_edges(0, self.n_iterations, self.max_points)
        fr = self.fraction_series(by)
        fcentres = bin_centres(fedges)
        out["fraction_edges"] = fedges
        out["fractions"] = {k: (fcentres, binned_mean(with_prefix(v), fedges)) for k, v in fr.items()}
        # cumulative LCA per layer from the start of the range, at the bin edges
        p = self._prefix["layer"]
        out["cumulative"] = (edges.astype(np.float64), (p[edges] - p[start]).T)
        # elements at the chosen granularity: per-layer helped / hurt bars, histogram of the selection
        totals = self.element_totals(by, start, stop)
        n_layers = len(self.layers)
        neg, pos = np.minimum(totals, 0.0), np.maximum(totals, 0.0)
        owners = self._elem_layer[by]
        bars = np.stack(
            [np.bincount(owners, weights=neg, minlength=n_layers), np.bincount(owners, weights=pos, minlength=n_layers)]
        )
        out["bar_counts"] = np.stack(
            [np.bincount(owners[totals < 0], minlength=n_layers), np.bincount(owners[totals > 0], minlength=n_layers)]
        )
        out["layer_net"] = bars.sum(axis=0)  # before the sign filter: the layer's share of the loss change
        out["loss_change"] = float(self._loss[stop] - self._loss[start])
        if sign == "helped":
            bars[1] = 0.0
        elif sign == "hurt":
            bars[0] = 0.0
        out["bars"] = bars
        mask = self._selected_elements(totals, by)
        values = totals[mask]
        out["elements"] = (self._labels[by][mask], owners[mask], values)
        out["histogram"] = histogram(values, self.histogram_bins, TAIL / 100)
        # heat map: units of the chosen layer (layers when none is chosen) x bins of iterations
        hedges_t = bin_edges(start, stop, self.heatmap_columns)
        out["heatmap_named"] = layer is None or "unit" not in self._prefix
        if layer is None:
            prefix_rows, row_labels = p, np.arange(n_layers, dtype=np.float64)
            row_names = list(self.layers)
        elif "unit" in self._prefix:
            cols = np.flatnonzero(self._elem_layer["unit"] == layer)
            prefix_rows, row_labels = self._prefix["unit"][:, cols], self._units_of_layer[cols].astype(np.float64)
            row_names = [f"unit {int(u)}" for u in row_labels]
        else:  # a result reduced to tensors or layers: the chosen layer's tensors (or the layer itself)
            by = "tensor" if "tensor" in self._prefix else "layer"
            cols = np.flatnonzero(self._elem_layer[by] == layer)
            prefix_rows, row_labels = self._prefix[by][:, cols], np.arange(len(cols), dtype=np.float64)
            row_names = [str(x) for x in self._labels[by][cols]]
        heat = binned_sum(prefix_rows, hedges_t).T  # (rows, columns)
        groups = group_rows(heat.shape[0], self.heatmap_rows)
        if len(groups) - 1 < heat.shape[0]:  # more units than pixel rows: sum neighbouring units
            heat = np.add.reduceat(heat, groups[:-1], axis=0)
            lo, hi = row_labels[groups[:-1]], row_labels[groups[1:] - 1]
            row_names = [
                f"units {int(a)}–{int(b)}" if a != b else f"unit {int(a)}" for a, b in zip(lo, hi, strict=True)
            ]
            row_labels = (lo + hi) / 2
        if sign == "helped":
            heat = np.minimum(heat, 0.0)
        elif sign == "hurt":
            heat = np.maximum(heat, 0.0)
        out["heatmap"] = (bin_centres(hedges_t), row_labels, heat)
        out["heatmap_edges"], out["heatmap_rows"] = hedges_t, row_names
        out["heatmap_limit"] = colour_limit(heat)
        return out

    # -- drawing ----------------------------------------------------------------------------------
    def update(self):
        """Recompute from the controls and update every mark in place (one message per mark)."""
        start, stop = self.range.value
        if stop <= start:  # a zero-width range holds no iteration: say so, keep the last drawing
            self.summary.value = self._summary_box(
                f"<b>iterations [{start}, {stop}) hold no iteration</b>: drag the handles apart to include at "
                "least one (the figures still show the last range)."
            )
            return
        s = self.compute()
        m = self.marks
        f32 = _f32
        sign = self.sign.value
        figs = self.figures
        ticks = _x_ticks(start, stop)
        if not self._from_brush:  # sent now, before the held marks: one burst, not a last message on its own
            self._sync_brush(start, stop)
        with ExitStack() as stack:
            for mark in m.values():
                stack.enter_context(mark.hold_sync())
            for key in ("loss", "cumulative"):  # one domain message; each mark then redraws only itself
                xs = m[key].scales["x"]
                stack.enter_context(xs.hold_sync())
                _put(xs, "min", float(start))
                _put(xs, "max", float(stop))
            for key in ("loss", "reconstructed"):
                m[key].x, m[key].y = f32(s[key][0]), f32(s[key][1])
            self._set_y(stack, "loss", m["loss"], np.concatenate([s["loss"][1], s["reconstructed"][1]]))
            for name in ("loss", "residual", "cumulative"):
                _put(figs[name].axes[0], "tick_values", ticks)
            self._draw_residual(s)
            self._draw_fractions(s, sign)
            m["cumulative"].x, m["cumulative"].y = f32(s["cumulative"][0]), f32(s["cumulative"][1])
            self._set_y(stack, "cumulative", m["cumulative"], s["cumulative"][1])
            self._set_y(stack, "layers", m["helped_bars"], np.concatenate([s["bars"].ravel(), [0.0]]), pad=0.06)
            self._draw_bars(s)
            self._draw_histogram(s)
            self._draw_heatmap(s, stack)
        self._state = s
        self.summary.value = self._summary_html(s)

    def _set_y(self, stack, figure: str, mark, values, pad: float = 0.04):
        """The y scale's domain around ``values`` and round tick values within it."""
        finite = np.asarray(values, dtype=np.float64).ravel()
        finite = finite[np.isfinite(finite)]
        lo, hi = (float(finite.min()), float(finite.max())) if len(finite) else (0.0, 1.0)
        scale = mark.scales["y"]
        stack.enter_context(scale.hold_sync())
        lo, hi = figures.padded(lo, hi, pad)
        _put(scale, "min", lo)
        _put(scale, "max", hi)
        _put(self.figures[figure].axes[1], "tick_values", figures.nice_ticks(lo, hi, 5))

    def _draw_residual(self, s):
        m = self.marks
        x, y = s["residual"]
        m["residual"].x, m["residual"].y = _f32(x), _f32(y)
        finite = y[np.isfinite(y)]
        top = max(float(np.abs(finite).max()) if len(finite) else 0.0, self._tol or 0.0) * 1.15 or 1.0
        rs = m["residual"].scales["y"]
        with rs.hold_sync():
            rs.min, rs.max = -top, top
        if self._tol:
            x0, x1 = float(s["start"]), float(s["stop"])
            m["tolerance"].x = _f32([x0, x1])
            m["tolerance"].y = _f32([[self._tol, self._tol], [-self._tol, -self._tol]])
        axis = self.figures["residual"].axes[1]
        mark = self._tol if self._tol and self._tol * 1.15 >= top * 0.5 else top / 1.15
        _put(axis, "tick_values", np.array([-mark, 0.0, mark]))

    def _draw_fractions(self, s, sign):
        m = self.marks
        # the overview covers the whole run: its length is part of the key (a followed run grows)
        key = (self.granularity.value, self.selected_layer, self.smoothing.value, self.n_iterations)
        for name in ("helped", "hurt", "zero"):
            m[name].visible = sign == "both" or sign == name
        if key == self._fraction_key:  # the overview does not depend on the range: not resent on a slider move
            return
        self._fraction_key = key
        for name, (x, y) in s["fractions"].items():
            m[name].x, m[name].y = _f32(x), _f32(y)

    def _draw_bars(self, s):
        m, figs = self.marks, self.figures
        labels = [
            f"{name} · {_share(net, s['loss_change'])}" for name, net in zip(self.layers, s["layer_net"], strict=True)
        ]
        xs = m["helped_bars"].scales["x"]
        self._syncing = True
        try:
            xs.domain = labels
            for row, key in enumerate(("helped_bars", "hurt_bars")):
                _put(m[key], "x", np.asarray(labels))
                m[key].y = _f32(s["bars"][row])
                m[key].selected = None if self.selected_layer is None else [self.selected_layer]
        finally:
            self._syncing = False
        figs["layers"].axes[0].tick_rotate = -25 if len(labels) > 4 else 0
        nothing = not np.any(s["bars"])
        what = {"both": "moved", "helped": "helped", "hurt": "hurt"}[self.sign.value]
        if nothing:  # the message is sent only when it shows
            _put(m["layers_empty"], "text", [f"No layer {what} in iterations [{s['start']}, {s['stop']})"])
        m["layers_empty"].visible = bool(nothing)

    def _draw_histogram(self, s):
        m, fig = self.marks, self.figures["histogram"]
        centres, counts, _width, zeros, outside = s["histogram"]
        log = self.log_count.value
        scale = self._log_count_scale if log else self._linear_count
        shown = np.where(counts > 0, counts, 0.5) if log else counts
        for key, part in (("histogram_helped", centres < 0), ("histogram_hurt", centres > 0)):
            bars = m[key]
            if bars.scales["y"] is not scale:
                bars.scales = {"x": bars.scales["x"], "y": scale}
            bars.base = 0.5 if log else 0.0
            bars.x, bars.y = _f32(centres[part]), _f32(shown[part])
        top = float(counts.max()) if len(counts) else 1.0
        if len(centres):
            lo, hi = figures.padded(float(centres[0]) - _width / 2, float(centres[-1]) + _width / 2, 0.02)
            xs = m["histogram_helped"].scales["x"]
            with xs.hold_sync():
                xs.min, xs.max = lo, hi
            _put(fig.axes[0], "tick_values", figures.nice_ticks(lo, hi, 5))
        axis = fig.axes[1]
        axis.scale = scale
        if log:
            _put(axis, "tick_values", 10.0 ** np.arange(0, int(np.ceil(np.log10(max(top, 1.0)))) + 1))
            axis.label, axis.tick_format = "count (log)", "~s"
            scale.max = float(max(top, 1.0) * 1.5)
        else:
            _put(axis, "tick_values", figures.integer_ticks(0, top, 5))
            axis.label, axis.tick_format = "count", "d"
            scale.max = float(max(top, 1.0))
        n = int(counts.sum())
        what = {"both": "element", "helped": "element that helped", "hurt": "element that hurt"}[self.sign.value]
        empty = n == 0
        m["histogram_empty"].visible = empty
        for a in fig.axes:
            a.visible = not empty
        if empty:
            where = "" if self.selected_layer is None else f" of {self.layer.value}"
            verb = "moved" if self.sign.value == "both" else "in"
            _put(m["histogram_empty"], "text", [f"No {what}{where} {verb} iterations [{s['start']}, {s['stop']})"])
        fig.title = f"Distribution of LCA ({n:,} elements; {zeros:,} exactly 0, not drawn)"
        tails = f"; the end bins hold {outside:,} beyond p{TAIL:g}–p{100 - TAIL:g}" if outside else ""
        fig.axes[0].label = f"LCA in range (← helped, hurt →){tails}"

    def _draw_heatmap(self, s, stack):
        m, fig = self.marks, self.figures["heatmap"]
        x, y, heat = _at_least_two(*s["heatmap"])
        limit = s["heatmap_limit"]
        heatmap = m["heatmap"]
        relative = np.clip(heat / limit, -1.0, 1.0) if limit > 0 else heat  # saturated beyond the limit
        heatmap.x, heatmap.y, heatmap.color = _f32(x), _f32(y), _f32(relative)
        unit_axis, name_axis, colour_axis = fig.axes[1], fig.axes[2], fig.axes[3]
        bar, xs, ys = colour_axis.scale, heatmap.scales["x"], heatmap.scales["y"]
        for sc in (bar, xs, ys):
            stack.enter_context(sc.hold_sync())
        _put(bar, "min", -(limit or 1.0))
        _put(bar, "max", limit or 1.0)
        edges = s["heatmap_edges"]
        _put(xs, "min", float(edges[0]) - 0.5)
        _put(xs, "max", float(edges[-1]) - 0.5)
        step = float(y[1] - y[0])
        _put(ys, "min", float(y[0]) - step / 2)
        _put(ys, "max", float(y[-1]) + step / 2)
        n_rows = heat.shape[0] if s["heatmap"][2].shape[0] >= 2 else 1
        _put(fig.axes[0], "tick_values", _x_ticks(s["start"], s["stop"]))
        colour_axis.label = figures.COLOUR_LABEL
        _put(colour_axis, "tick_values", np.array([-limit, 0.0, limit]) if limit else None)
        clip = f" · colour ±{limit:.2g} = p99 |LCA|" if limit else ""
        rows = s["heatmap_rows"]
        if s["heatmap_named"]:
            names = m["heatmap_names"]
            names.domain = list(reversed(rows)) if len(rows) >= 2 else [rows[0], " "][::-1]
            name_axis.visible, unit_axis.visible = True, False
            _put(
                name_axis, "tick_values", None if len(rows) <= 16 else list(reversed(rows))[:: max(1, len(rows) // 16)]
            )
            per = "layer" if self.selected_layer is None or "tensor" not in self._prefix else "tensor"
            name_axis.label = per  # a layer's rows are its tensors where the result keeps no units
            if self.selected_layer is None:
                fig.title = f"LCA per layer and iteration{clip}"
            else:
                fig.title = f"{self.layer.value}: LCA per {per}{clip}"
        else:
            name_axis.visible, unit_axis.visible = False, True
            _put(unit_axis, "tick_values", figures.integer_ticks(float(y[0]), float(y[n_rows - 1]), 6))
            grouped = len(rows) and rows[0].startswith("units")
            unit_axis.label = "unit (rows sum neighbours)" if grouped else "unit"
            fig.title = f"{self.layer.value}: LCA per unit and iteration{clip}"
        nothing = not np.any(s["heatmap"][2])
        what = {"both": "moved", "helped": "helped", "hurt": "hurt"}[self.sign.value]
        if nothing:
            _put(m["heatmap_empty"], "text", [f"Nothing {what} in iterations [{s['start']}, {s['stop']})"])
        m["heatmap_empty"].visible = bool(nothing)
        heatmap.visible = not nothing

    def _summary_box(self, body: str) -> str:
        notes = "".join(
            f'<div class="lca-note" style="color:{figures.HURT}">{html.escape(n)}</div>' for n in self.notes
        )
        return f'<div style="line-height:1.35">{body}{notes}</div>'

    def _summary_html(self, s) -> str:
        start, stop = s["start"], s["stop"]
        loss0, loss1 = self._loss[start], self._loss[stop]
        _labels, _, values = s["elements"]
        total = float(self.element_totals("layer", start, stop).sum())
        residual = float(np.sum(self._residual_finite[start:stop]))
        rest = float(np.nansum(self._rest[start:stop]))  # the parameters not selected (analyze(parameters=...))
        others = f", other parameters {rest:+.6g}" if np.any(self._rest[start:stop] != 0) else ""
        by = self.granularity.value
        where = "all layers" if self.selected_layer is None else self.layer.value
        zeros = s["histogram"][3]
        body = (
            f'<div class="lca-summary" data-start="{start}" data-stop="{stop}" data-n="{len(values)}">'
            f"<b>iterations [{start}, {stop})</b> of {self.n_iterations} &middot; loss {loss0:.6g} &rarr; {loss1:.6g} "
            f"(change {loss1 - loss0:+.6g}) &middot; LCA sum {total:+.6g}{others}, residual {residual:+.3g}<br>"
            f"{html.escape(where)}, by {by}, {self.sign.value}: <b>{len(values)}</b> elements "
            f"({zeros:,} exactly 0), sum {values.sum():+.6g}{self._helped_band(start, stop)}</div>"
        )
        return self._summary_box(body)

    def _helped_band(self, start: int, stop: int) -> str:
        """With a per-iteration error estimate on every iteration (``param_tol``), the share of parameters that
        helped as a band: signs within the estimate are uncertain (``LCAResult.fractions(uncertain=True)``).
        Computed once per length of the result: one pass over ``lca``, which only such runs pay."""
        cached = getattr(self, "_band_cache", None)
        if cached is None or len(cached[0]) != self.n_iterations:
            band = None
            error = self.result.dataset["error"].values if "error" in self.result.dataset else np.array([np.nan])
            if np.isfinite(np.asarray(error, dtype=np.float64)).all():
                try:
                    f = self.result.fractions(uncertain=True)
                    band = (f.helped.values.reshape(-1), f.uncertain.values.reshape(-1))
                except ReducedResultError:  # a reduced result without what the band needs: no band
                    band = None
            cached = self._band_cache = (np.zeros(self.n_iterations), band)
        band = cached[1]
        if band is None:
            return ""
        lo = float(np.mean(band[0][start:stop]))
        hi = lo + float(np.mean(band[1][start:stop]))
        return (
            f"<br>helped: {100 * lo:.1f}%&ndash;{100 * hi:.1f}% of parameters per iteration, on average "
            '<span title="signs within the largest estimated quadrature error (param_tol) are uncertain">(band: '
            "uncertain signs)</span>"
        )

    # -- events -----------------------------------------------------------------------------------
    def _on_control(self, change):
        if change["owner"] is self.layer and change["new"] is None:  # layer=None from Python: all layers
            self.layer.value = ALL_LAYERS  # observed again: that call updates
            return
        self.update()

    def _on_bar_selected(self, change):
        if self._syncing:
            return
        selected = change["new"]
        if selected is None or len(selected) == 0:
            return  # a click on the background must not lose the chosen layer
        self.layer.value = self.layers[int(selected[-1])]

    def _on_brush(self, change):
        """A drag on the fractions chart sets the range (whole iterations, at least one)."""
        if self._syncing:
            return
        sel = self.brush.selected
        if sel is None or len(sel) != 2:
            return
        t = self.n_iterations
        lo, hi = sorted(float(v) for v in sel)
        start = int(np.clip(round(lo), 0, t - 1))
        stop = int(np.clip(round(hi), start + 1, t))
        if (start, stop) != tuple(self.range.value):
            self._from_brush = True  # while the drag goes on, the band follows the pointer, not the slider
            try:
                self.range.value = (start, stop)
            finally:
                self._from_brush = False
        if not self.brush.brushing:  # the drag ended: the band snaps to whole iterations
            self._sync_brush(start, stop)

    def _sync_brush(self, start, stop):
        self._syncing = True
        try:
            full = (start, stop) == (0, self.n_iterations)
            self.brush.selected = None if full else np.array([float(start), float(stop)])
        finally:
            self._syncing = False

    # -- tooltips (HTML filled on hover) -------------------------------------------------------------
    def _hover_column(self, content, mark) -> float | None:
        """Where a hover grid point sits across the plot (0 = left, 1 = right), from the front end's message."""
        point = content.get("data") or content.get("point") or {}
        index = point.get("index")
        if index is None:
            return None
        return float(np.asarray(mark.x)[int(index)])

    def _iteration_at(self, fraction: float) -> int:
        start, stop = self.range.value
        return int(np.clip(round(start + fraction * (stop - start)), start, stop))

    def tooltip_at_checkpoint(self, k: int) -> str:
        """The loss figure's tooltip at checkpoint ``k``: every series there."""
        rows = [("true loss", f"{self._loss[k]:.6g}"), ("rebuilt from LCA", f"{self._reconstructed[k]:.6g}")]
        if k < self.n_iterations:
            res = self.residual_series()[k]
            rows.append(
                (f"residual (iteration {k})", f"{res:+.3g}" + ("" if self._tol is None else f" (tol {self._tol:.0e})"))
            )
            fr = self.fraction_series()
            rows += [(f"{name}", f"{fr[name][k]:.1%}") for name in ("helped", "hurt", "zero")]
        w = self.smoothing.value
        return _table(f"checkpoint {k}" + (f" (residual, fractions: mean of the last {w})" if w > 1 else ""), rows)

    def _on_loss_hover(self, mark, content):
        fraction = self._hover_column(content, mark)
        if fraction is not None:
            mark.tooltip.value = self.tooltip_at_checkpoint(self._iteration_at(fraction))

    def tooltip_cumulative(self, k: int) -> str:
        start = self.range.value[0]
        p = self._prefix["layer"]
        values = p[k] - p[start]
        total = float(values.sum())
        rows = [(name, f"{v:+.4g} ({_share(v, total)})") for name, v in zip(self.layers, values, strict=True)]
        return _table(f"iterations [{start}, {k}), LCA (share)", rows)

    def _on_cumulative_hover(self, mark, content):
        fraction = self._hover_column(content, mark)
        if fraction is not None:
            mark.tooltip.value = self.tooltip_cumulative(self._iteration_at(fraction))

    def tooltip_heatmap(self, fx: float, fy: float) -> str:
        """The heat map cell at plot fractions ``fx`` (left to right) and ``fy`` (bottom to top)."""
        s = self._state
        heat = s["heatmap"][2]
        edges = s["heatmap_edges"]
        it = edges[0] + fx * (edges[-1] - edges[0])
        j = int(np.clip(np.searchsorted(edges, it, side="right") - 1, 0, heat.shape[1] - 1))
        i = int(np.clip(np.floor((1.0 - fy) * heat.shape[0]), 0, heat.shape[0] - 1))
        value, limit = float(heat[i, j]), s["heatmap_limit"]
        note = " (beyond the colour bar)" if limit and abs(value) > limit else ""
        rows = [(s["heatmap_rows"][i], f"{value:+.4g}{note}")]
        return _table(f"iterations [{edges[j]}, {edges[j + 1]})", rows)

    def _on_heatmap_hover(self, mark, content):
        point = content.get("data") or content.get("point") or {}
        if point.get("index") is None:
            return
        k = int(point["index"])
        mark.tooltip.value = self.tooltip_heatmap(float(np.asarray(mark.x)[k]), float(np.asarray(mark.y)[k]))

    def tooltip_layer(self, i: int) -> str:
        s = self._state
        helped, hurt = s["bars"][0][i], s["bars"][1][i]
        n_helped, n_hurt = s["bar_counts"][:, i]
        net = s["layer_net"][i]
        rows = [
            ("helped (sum < 0)", f"{helped:+.6g} ({n_helped:,} elements)"),
            ("hurt (sum > 0)", f"{hurt:+.6g} ({n_hurt:,} elements)"),
            ("net LCA", f"{net:+.6g}"),
            ("share of the loss change", _share(net, s["loss_change"])),
        ]
        return _table(f"{self.layers[i]}, iterations [{s['start']}, {s['stop']})", rows)

    def _on_bar_hover(self, mark, content):
        point = content.get("data") or content.get("point") or {}
        if point.get("index") is not None:
            mark.tooltip.value = self.tooltip_layer(int(point["index"]))

    def _on_histogram_hover(self, mark, content):
        point = content.get("data") or content.get("point") or {}
        if point.get("index") is None:
            return
        centre = float(np.asarray(mark.x)[int(point["index"])])
        centres, counts, width, _zeros, _outside = self._state["histogram"]
        k = int(np.argmin(np.abs(centres - centre)))
        n = max(int(counts.sum()), 1)
        rows = [("count", f"{int(counts[k]):,} ({counts[k] / n:.1%} of those drawn)")]
        mark.tooltip.value = _table(f"LCA in [{centres[k] - width / 2:.3g}, {centres[k] + width / 2:.3g})", rows)

    # -- export -----------------------------------------------------------------------------------
    def selection(self) -> xr.Dataset:
        """What is on screen as a Dataset: the selected elements' LCA over the range, per-layer helped /
        hurt, and every plotted series at its plotted resolution.

        >>> import lca_notebook as lca
        >>> lca.explore(lca.LCAResult.example(), granularity="layer").selection()["lca"].values.round(3).tolist()
        [-0.45, 0.05]
        """
        s = self._state
        by = self.granularity.value
        labels, owners, values = s["elements"]
        layer_names = np.asarray(self.layers)
        fr = s["fractions"]
        ds = xr.Dataset(
            {
                "lca": (("element",), values, {"long_name": f"LCA summed over iterations [{s['start']}, {s['stop']})"}),
                "layer_helped": (("layer",), s["bars"][0]),
                "layer_hurt": (("layer",), s["bars"][1]),
                "loss": (("checkpoint",), s["loss"][1]),
                "reconstructed_loss": (("checkpoint",), s["reconstructed"][1]),
                "residual": (("bin",), s["residual"][1], {"long_name": "residual of largest magnitude in the bin"}),
                **{f"fraction_{k}": (("run_bin",), v[1]) for k, v in fr.items()},
                "cumulative": (("layer", "checkpoint"), s["cumulative"][1]),
                "histogram_count": (("histogram_bin",), s["histogram"][1]),
                "layer_share": (("layer",), _shares(s["layer_net"], s["loss_change"])),
            },
            coords={
                "element": np.asarray([str(x) for x in labels]),
                "element_layer": (("element",), layer_names[owners] if len(owners) else np.zeros(0, dtype=str)),
                "layer": layer_names,
                "checkpoint": s["edges"],
                "bin": s["residual"][0],
                "run_bin": fr["helped"][0],
                "histogram_bin": s["histogram"][0],
            },
            attrs={
                "start": s["start"],
                "stop": s["stop"],
                "granularity": by,
                "layer": "" if self.selected_layer is None else self.layer.value,
                "sign": self.sign.value,
                "smoothing": self.smoothing.value,
                "exact_zeros": s["histogram"][3],
            },
        )
        return ds

    def export(self, path, *, overwrite: bool = False) -> list[str]:
        """Write what is on screen: ``.csv`` (the selected elements' LCA), ``.nc`` (:meth:`selection`),
        ``.png`` / ``.svg`` (each figure as ``<stem>_<figure><ext>``). Returns the paths.

        An existing file is replaced only with ``overwrite=True`` (the panel's button asks for a second
        click), and an LCA result or a folder never is.

        PNG and SVG are rendered by the browser showing the panel and arrive asynchronously: the files
        appear once the front end answers (none without a displayed panel).
        """
        path = local_path(path)
        stem, ext = os.path.splitext(path)
        ext = ext.lower()
        if ext not in (".csv", ".nc", ".png", ".svg"):
            raise ValueError(f"cannot export to {path!r}: use a name ending in .csv, .nc, .png or .svg")
        targets = [f"{stem}_{name}{ext}" for name in self.figures] if ext in (".png", ".svg") else [path]
        for target in (t for t in targets if os.path.exists(t)):
            kind = saved_kind(target)
            if kind == "result" or os.path.isdir(target):
                what = "an LCA result" if kind == "result" else "a folder"
                raise FileExistsError(f"{target} is {what}, which an export never replaces: choose another name")
            if not overwrite:
                raise _Exists(target)
        if ext == ".csv":
            ds = self.selection()
            lines = ["element,layer,lca,start,stop"]
            start, stop = ds.attrs["start"], ds.attrs["stop"]
            for e, lay, v in zip(ds["element"].values, ds["element_layer"].values, ds["lca"].values, strict=False):
                lines.append(f"{_csv(e)},{_csv(lay)},{float(v)!r},{start},{stop}")
            with open(path, "w") as fh:
                fh.write("\n".join(lines) + "\n")
            return [path]
        if ext == ".nc":
            self.selection().to_netcdf(path, engine="h5netcdf")
            return [path]
        for fig, target in zip(self.figures.values(), targets, strict=True):  # .png, .svg: one file a figure
            writer = _file_writer(target, self.export_status)
            fig.get_png_data(writer) if ext == ".png" else fig.get_svg_data(writer)
        return targets

    def _export_clicked(self):
        path = self.export_path.value
        try:  # an existing file: a second click on the same name replaces it
            paths = self.export(path, overwrite=self._confirmed == path)
        except _Exists as exc:
            self._confirmed = path
            self.export_status.value = f"{html.escape(exc.target)} exists: click Export again to replace it"
            return
        except Exception as exc:  # shown in the panel: a button callback's exception would vanish
            self._confirmed = None
            self.export_status.value = f'<span style="color:#d73027">export failed: {html.escape(str(exc))}</span>'
            return
        self._confirmed = None
        if self.export_path.value.lower().endswith((".png", ".svg")):
            self.export_status.value = f"rendering {len(paths)} figures in the browser&hellip;"
        else:
            self.export_status.value = f"wrote {html.escape(paths[0])}"


class _Exists(FileExistsError):
    """An export's file exists and may be replaced (``overwrite=True``)."""

    def __init__(self, target: str):
        super().__init__(f"{target} exists: choose another name, or replace it (overwrite=True)")
        self.target = target


def _csv(text) -> str:
    text = str(text)
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n') else text


def _file_writer(path, status):
    def write(data):
        with open(path, "wb") as fh:
            fh.write(bytes(data))
        status.value = f"wrote {html.escape(path)}"

    return write


def _at_least_two(x, y, c):
    """bqplot's HeatMap needs two rows and two columns to size its cells: pad with a blank one."""
    if len(x) < 2:
        x = np.array([x[0] if len(x) else 0.0, (x[0] if len(x) else 0.0) + 1.0])
        c = np.concatenate([c, np.zeros((c.shape[0], 2 - c.shape[1]))], axis=1) if c.shape[1] < 2 else c
    if len(y) < 2:
        y = np.array([y[0] if len(y) else 0.0, (y[0] if len(y) else 0.0) + 1.0])
        c = np.concatenate([c, np.zeros((2 - c.shape[0], c.shape[1]))], axis=0)
    return x, y, c


def _put(widget, name: str, value) -> None:
    """Set a trait only when it changes (arrays compared by value): each change is a message and a redraw."""
    old = getattr(widget, name)
    if isinstance(value, np.ndarray) or isinstance(old, np.ndarray):
        if old is not None and value is not None and np.shape(old) == np.shape(value) and np.array_equal(old, value):
            return
    elif old == value:
        return
    setattr(widget, name, value)


def _x_ticks(lo: int, hi: int) -> np.ndarray:
    """Iteration ticks, without one on the right edge of the plot (the frame's end would cross its label).

    >>> _x_ticks(0, 150).tolist(), _x_ticks(10, 12).tolist()
    ([0, 50, 100], [10, 11, 12])
    """
    ticks = figures.integer_ticks(lo, hi)
    if len(ticks) >= 4 and hi - ticks[-1] < 0.04 * (hi - lo):
        ticks = ticks[:-1]
    return ticks


def _label(text: str) -> widgets.Label:
    """A control's name beside it (a ToggleButtons' own description wraps above its buttons in narrow rows)."""
    return widgets.Label(text, layout=widgets.Layout(width="72px", justify_content="flex-end", padding="0 8px 0 0"))


def _f32(a) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def _share(part: float, whole: float) -> str:
    """``part`` as a percentage of ``whole`` ("–" when the whole is zero or not finite)."""
    if not np.isfinite(whole) or abs(whole) < 1e-12 or not np.isfinite(part):
        return "–"
    return f"{part / whole:.0%}"


def _shares(parts: np.ndarray, whole: float) -> np.ndarray:
    """Each part's fraction of ``whole`` (NaN when the whole is zero)."""
    parts = np.asarray(parts, dtype=np.float64)
    return parts / whole if np.isfinite(whole) and abs(whole) >= 1e-12 else np.full_like(parts, np.nan)


def _table(title: str, rows) -> str:
    cells = "".join(
        f'<tr><td style="padding-right:8px">{html.escape(k)}</td>'
        f'<td style="text-align:right">{html.escape(v)}</td></tr>'
        for k, v in rows
    )
    return f'<div class="lca-tooltip-body"><b>{html.escape(title)}</b><table>{cells}</table></div>'


def _tolerance(attrs) -> float | None:
    """The adaptive rule's tolerance on |residual| per iteration, if the result was computed with one."""
    if attrs.get("method") != "adaptive":
        return None
    try:
        tol = float(attrs.get("tol"))
    except (TypeError, ValueError):
        return None
    return tol if np.isfinite(tol) and tol > 0 else None


def _extreme_per_bin(series: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(bin centres, the value of largest magnitude in each bin ``[e0, e1)``): a bin never hides an
    iteration past the tolerance. NaN only where every value of the bin is NaN."""
    part = series[edges[0] : edges[-1]]
    finite = np.where(np.isfinite(part), part, 0.0)
    starts = edges[:-1] - edges[0]
    hi, lo = np.maximum.reduceat(finite, starts), np.minimum.reduceat(finite, starts)
    value = np.where(np.abs(hi) >= np.abs(lo), hi, lo)
    all_nan = np.logical_and.reduceat(~np.isfinite(part), starts)
    return bin_centres(edges), np.where(all_nan, np.nan, value)


def histogram(values: np.ndarray, bins: int, tail: float = 0.005) -> tuple[np.ndarray, np.ndarray, float, int, int]:
    """(bin centres, counts, bin width, number of exact zeros, number in the tails) of the nonzero ``values``.

    Bins of equal width with 0 on an edge, so each holds helped (< 0) or hurt (> 0) elements, never both; they
    span the ``tail`` and ``1 - tail`` quantiles (and 0) of 200 values or more, and values beyond are counted in
    the end bins, so a few extreme elements do not squeeze the rest into one bar.

    >>> c, n, w, z, out = histogram(np.array([-2.0, -1.0, 0.0, 0.0, 3.0]), 5, tail=0.0)
    >>> c.tolist(), n.tolist(), w, z, out
    ([-1.5, -0.5, 0.5, 1.5, 2.5], [1.0, 1.0, 0.0, 0.0, 1.0], 1.0, 2, 0)
    """
    values = np.asarray(values, dtype=np.float64)
    zeros = int(np.count_nonzero(values == 0))
    moved = values[values != 0]
    if not len(moved):
        return np.zeros(0), np.zeros(0), 0.0, zeros, 0
    few = len(moved) < 200  # a tail of a handful of values is no outlier: span them all
    q_lo, q_hi = (moved.min(), moved.max()) if few or tail <= 0 else np.quantile(moved, [tail, 1.0 - tail])
    lo, hi = min(float(q_lo), 0.0), max(float(q_hi), 0.0)
    width = (hi - lo) / max(1, bins)
    edges = width * np.arange(np.floor(lo / width), np.ceil(hi / width) + 1)
    edges[0], edges[-1] = min(edges[0], lo), max(edges[-1], hi)  # width * k can round to just inside lo or hi
    outside = int(np.count_nonzero((moved < edges[0]) | (moved > edges[-1])))
    inside = np.clip(moved, edges[0], edges[-1])
    counts, _ = np.histogram(inside, bins=len(edges) - 1, range=(edges[0], edges[-1]))  # equal bins: no sort
    return (edges[:-1] + edges[1:]) / 2, counts.astype(np.float64), float(width), zeros, outside


def colour_limit(heat: np.ndarray, percentile: float = 99.0) -> float:
    """The colour bar's symmetric limit: the ``percentile`` of |value| over the nonzero cells (0 if none);
    cells beyond it are drawn at the end colour.

    >>> colour_limit(np.array([[0.0, 1.0], [-2.0, 100.0]]), 50)
    2.0
    """
    mags = np.abs(heat[heat != 0])
    mags = mags[np.isfinite(mags)]
    return float(np.percentile(mags, percentile, method="lower")) if len(mags) else 0.0


class _Finite:
    """Row blocks of an (iteration, parameter) array with NaN and inf read as 0; counts them once."""

    def __init__(self, lca, block_rows: int = 256):
        self.lca, self.shape = lca, lca.shape
        self.n_bad, self.first_bad = 0, (0, 0)
        self._block_rows = block_rows

    def __getitem__(self, key) -> np.ndarray:
        block = np.array(self.lca[key], dtype=np.float32)
        block[~np.isfinite(block)] = 0.0
        return block

    def group_prefixes(self, groups, bys) -> dict[str, np.ndarray]:
        """Prefix sums ``(T+1, groups)`` at each granularity, non-finite values as 0 (counted on the way)."""
        t = self.shape[0]
        out = {by: np.zeros((t + 1, len(groups.labels(by)))) for by in bys}
        for t0 in range(0, t, self._block_rows):
            raw = np.asarray(self.lca[t0 : min(t, t0 + self._block_rows)])
            bad = ~np.isfinite(raw)
            if bad.any():
                if not self.n_bad:
                    i, j = np.argwhere(bad)[0]
                    self.first_bad = (t0 + int(i), int(j))
                self.n_bad += int(bad.sum())
                raw = np.where(bad, 0.0, raw)
            for by, sums in groups.sums(raw, bys).items():
                out[by][t0 + 1 : t0 + 1 + len(raw)] = sums
        for p in out.values():
            np.cumsum(p, axis=0, out=p)
        return out


def explore(result, *, follow: bool = False, interval: float = 1.0, **options) -> Explorer:
    """The interactive explorer of an ``LCAResult`` (an ipywidgets panel; display it or end a cell with it).

    ``result`` may be a result store's path. ``follow=True``: the store is still being filled
    (``analyze(..., store=PATH, follow=True)``, in this process or another): re-read it every ``interval``
    seconds and extend the range and figures in place (:meth:`Explorer.follow`), keeping the selection.

    >>> import lca_notebook as lca
    >>> panel = lca.explore(lca.LCAResult.example())
    >>> sorted(panel.figures)
    ['cumulative', 'fractions', 'heatmap', 'histogram', 'layers', 'loss', 'residual']
    """
    if isinstance(result, (str, bytes)) or hasattr(result, "__fspath__"):
        from ..storage.results import open as open_result

        result = open_result(result)
    explorer = Explorer(result, **options)
    return explorer.follow(interval) if follow else explorer
