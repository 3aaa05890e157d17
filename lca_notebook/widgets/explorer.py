"""The LCA explorer: one ipywidgets panel of controls and bqplot figures over an ``LCAResult``.

Everything a figure shows is a sum of prefix sums, reduced in Python to about the figure's pixel width
and sent as float32; a control change updates the marks' data in place under ``hold_sync()``. What
needs a pass over (iteration, parameter) is done once, at construction.

Tooltips give exact numbers on the lines (through invisible markers on their points), the layer bars
and the histogram. bqplot 0.13's canvas ``HeatMap`` reports no cell under the pointer, so the heat map
has none; its numbers are the chosen layer's in :meth:`Explorer.selection` / :meth:`Explorer.export`.

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
from contextlib import ExitStack

import ipywidgets as widgets
import numpy as np
import xarray as xr

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
ALL_LAYERS = "(all layers)"


class Explorer(widgets.VBox):
    """Interactive view of an ``LCAResult``: controls on top, six linked figures, export at the bottom.

    The controls are ``range`` (iterations ``[start, stop)``), ``granularity``, ``layer`` (``None`` for
    all layers), ``sign`` and ``smoothing``; set their ``.value`` from Python or drag them. ``marks``
    maps names to the bqplot marks, ``figures`` names to figures, :meth:`selection` gives what is on
    screen as an ``xarray.Dataset`` and :meth:`export` writes it (CSV, netCDF) or the figures (PNG, SVG).

    >>> import lca_notebook as lca
    >>> ex = lca.explore(lca.LCAResult.example(), granularity="unit")
    >>> ex.layer.value = "fc1"; ex.selection()["lca"].values.round(3).tolist()  # fc1's two neurons
    [-0.3, -0.15]
    """

    def __init__(
        self,
        result,
        *,
        granularity: str = "parameter",
        layer: str | None = None,
        sign: str = "both",
        smoothing: int = 1,
        width: int = 440,
        height: int = 270,
        max_points: int | None = None,
        heatmap_columns: int | None = None,
        heatmap_rows: int = 128,
        histogram_bins: int = 40,
        parameter_budget_bytes: int = 256 << 20,
    ):
        self.result = result
        r = result
        t = r.n_iterations
        if t < 1:
            raise ValueError(
                f"the result has {t} iterations; the explorer needs at least one (analyze at least 2 snapshots)"
            )
        self.n_iterations = t
        self.max_points = int(max_points or width)  # about one point per pixel of plot width
        self.heatmap_columns = int(heatmap_columns or max(2, width // 2))
        self.heatmap_rows, self.histogram_bins = int(heatmap_rows), int(histogram_bins)
        self._precompute(parameter_budget_bytes)

        # -- controls ---------------------------------------------------------------------------
        self.range = widgets.IntRangeSlider(
            value=(0, t),
            min=0,
            max=t,
            step=1,
            description="iterations",
            continuous_update=True,
            layout=widgets.Layout(width=f"{max(400, width)}px"),
            style={"description_width": "80px"},
        )
        self.granularity = widgets.ToggleButtons(
            options=list(GRANULARITIES),
            value=granularity,
            description="sum by",
            style={"button_width": "150px", "description_width": "80px"},
        )
        # values are strings: a Dropdown treats None as "nothing selected" and shows a blank box
        self.layer = widgets.Dropdown(
            options=[ALL_LAYERS, *self.layers],
            value=layer or ALL_LAYERS,
            description="layer",
            style={"description_width": "80px"},
        )
        self.sign = widgets.ToggleButtons(
            options=list(SIGNS),
            value=sign,
            description="show",
            style={"button_width": "70px", "description_width": "50px"},
        )
        self.smoothing = widgets.IntSlider(
            value=smoothing,
            min=1,
            max=max(1, min(500, t)),
            description="smoothing",
            continuous_update=True,
            style={"description_width": "80px"},
        )
        self.summary = widgets.HTML()
        self.summary.add_class("lca-summary")

        # -- figures ----------------------------------------------------------------------------
        fw, fh = width, height
        built = {
            "loss": figures.loss_figure(fw, fh),
            "fractions": figures.fractions_figure(fw, fh),
            "cumulative": figures.cumulative_figure(fw, fh, self.layers),
            "layers": figures.layer_bars_figure(fw, fh, self.layers),
            "heatmap": figures.heatmap_figure(fw, fh),
            "histogram": figures.histogram_figure(fw, fh),
        }
        self.figures = {k: f for k, (f, _) in built.items()}
        self.marks = {name: m for _, ms in built.values() for name, m in ms.items()}
        for name, fig in self.figures.items():
            fig.add_class(f"lca-figure-{name}")

        # -- export -----------------------------------------------------------------------------
        self.export_path = widgets.Text(
            value="lca_selection.csv",
            description="export to",
            placeholder="file.csv, .nc, .png or .svg",
            style={"description_width": "80px"},
            layout=widgets.Layout(width="380px"),
        )
        self.export_button = widgets.Button(
            description="Export", icon="download", tooltip="Write the selection (.csv, .nc) or the figures (.png, .svg)"
        )
        self.export_status = widgets.HTML()
        self.export_status.add_class("lca-export-status")
        self.export_button.on_click(lambda _: self._export_clicked())

        grid = widgets.GridBox(
            list(self.figures.values()),
            layout=widgets.Layout(grid_template_columns=f"repeat(auto-fill, {fw}px)", grid_gap="4px"),
        )
        super().__init__(
            [
                widgets.HBox([self.range, self.smoothing]),
                widgets.HBox([self.granularity]),
                widgets.HBox([self.layer, self.sign]),
                self.summary,
                grid,
                widgets.HBox([self.export_path, self.export_button, self.export_status]),
            ]
        )
        self.add_class("lca-explorer")

        self._syncing = False
        for control in (self.range, self.granularity, self.layer, self.sign, self.smoothing):
            control.observe(self._on_control, names="value")
        for key in ("helped_bars", "hurt_bars"):
            self.marks[key].observe(self._on_bar_selected, names="selected")
        self.update()

    # -- precomputation (once) ------------------------------------------------------------------
    def _precompute(self, budget):
        r = self.result
        groups = r.groups
        layer_ids = groups.ids("layer")
        self.layers = [str(x) for x in groups.labels("layer")]
        n_layers = len(self.layers)
        self._loss = np.asarray(r.loss.values, dtype=np.float64)
        self._reconstructed = np.asarray(r.reconstructed_loss().values, dtype=np.float64)
        self._residual_prefix = with_prefix(np.asarray(r.residual.values))

        # element -> layer, labels and per-layer counts at each granularity
        self._labels, self._elem_layer, self._prefix = {}, {}, {}
        for by in ("parameter", "unit", "tensor", "layer"):
            if by != "parameter":
                self._prefix[by] = np.asarray(r.prefix(by), dtype=np.float64)
            self._labels[by], self._elem_layer[by] = np.asarray(groups.labels(by)), groups.layer_of(by)
        self._units_of_layer = groups.unit_coords()["unit_index"]
        self._n_elements = {
            by: np.bincount(o, minlength=n_layers).astype(np.float64) for by, o in self._elem_layer.items()
        }
        # each layer's parameter columns: a slice where contiguous (cheap to read), else an index array
        self._columns = []
        for i in range(n_layers):
            cols = np.flatnonzero(layer_ids == i)
            contiguous = len(cols) and cols[-1] - cols[0] + 1 == len(cols)
            self._columns.append(slice(int(cols[0]), int(cols[-1]) + 1) if contiguous else cols)

        # per-iteration counts of helping / hurting elements per layer, at each granularity
        t = r.n_iterations
        helped = {"parameter": np.zeros((t, n_layers))}
        hurt = {"parameter": np.zeros((t, n_layers))}

        def count(t0, block):  # folded into the single pass that builds the parameter prefix
            rows = slice(t0, t0 + len(block))
            for i, cols in enumerate(self._columns):
                part = block[:, cols]
                helped["parameter"][rows, i] = np.count_nonzero(part < 0, axis=1)
                hurt["parameter"][rows, i] = np.count_nonzero(part > 0, axis=1)

        lca = r.lca.data if isinstance(r.lca.data, np.ndarray) else r.lca
        self._parameters = ParameterRanges(lca, budget_bytes=budget, on_block=count)
        for by in ("unit", "tensor", "layer"):
            per = np.diff(self._prefix[by], axis=0)
            onehot = np.zeros((per.shape[1], n_layers))
            onehot[np.arange(per.shape[1]), self._elem_layer[by]] = 1.0
            helped[by], hurt[by] = (per < 0) @ onehot, (per > 0) @ onehot
        self._helped_counts, self._hurt_counts = helped, hurt

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

    def _fraction_series(self, by):
        """Per-iteration fractions (helped, hurt, zero) overall or of the chosen layer, smoothed."""
        layer = self.selected_layer
        h, u, n = self._helped_counts[by], self._hurt_counts[by], self._n_elements[by]
        if layer is None:
            helped, hurt, count = h.sum(axis=1), u.sum(axis=1), n.sum()
        else:
            helped, hurt, count = h[:, layer], u[:, layer], n[layer]
        helped, hurt = helped / count, hurt / count
        out = {"helped": helped, "hurt": hurt, "zero": 1.0 - helped - hurt}
        return {k: trailing_mean(v, self.smoothing.value) for k, v in out.items()}

    def compute(self) -> dict:
        """Everything the figures show for the current control values, as float64 arrays (not yet sent)."""
        start, stop = self.range.value
        by = self.granularity.value
        layer = self.selected_layer
        edges = bin_edges(start, stop, self.max_points)
        centres = bin_centres(edges)
        out = {"start": start, "stop": stop, "edges": edges}
        # loss: the checkpoints at the bin edges (exact values there), residual summed per bin
        out["loss"] = (edges.astype(np.float64), self._loss[edges])
        out["reconstructed"] = (edges.astype(np.float64), self._reconstructed[edges])
        out["residual"] = (centres, binned_sum(self._residual_prefix, edges))
        # fractions: smoothed per iteration, then averaged per bin
        fr = self._fraction_series(by)
        out["fractions"] = {k: (centres, binned_mean(with_prefix(v), edges)) for k, v in fr.items()}
        # cumulative LCA per layer from the start of the range, at the bin edges
        p = self._prefix["layer"]
        out["cumulative"] = (edges.astype(np.float64), (p[edges] - p[start]).T)
        # elements at the chosen granularity: per-layer helped / hurt bars, histogram of the selection
        totals = self.element_totals(by, start, stop)
        n_layers = len(self.layers)
        neg, pos = np.minimum(totals, 0.0), np.maximum(totals, 0.0)
        bars = np.stack(
            [
                np.bincount(self._elem_layer[by], weights=neg, minlength=n_layers),
                np.bincount(self._elem_layer[by], weights=pos, minlength=n_layers),
            ]
        )
        if self.sign.value == "helped":
            bars[1] = 0.0
        elif self.sign.value == "hurt":
            bars[0] = 0.0
        out["bars"] = bars
        mask = self._selected_elements(totals, by)
        values = totals[mask]
        out["elements"] = (self._labels[by][mask], self._elem_layer[by][mask], values)
        if len(values):
            counts, hedges = np.histogram(values, bins=self.histogram_bins)
            out["histogram"] = ((hedges[:-1] + hedges[1:]) / 2, counts.astype(np.float64))
        else:
            out["histogram"] = (np.zeros(0), np.zeros(0))
        # heat map: units of the chosen layer (layers when none is chosen) x bins of iterations
        hedges_t = bin_edges(start, stop, self.heatmap_columns)
        if layer is None:
            prefix_rows, row_labels = p, np.arange(n_layers, dtype=np.float64)
        else:
            cols = np.flatnonzero(self._elem_layer["unit"] == layer)
            prefix_rows, row_labels = self._prefix["unit"][:, cols], self._units_of_layer[cols].astype(np.float64)
        heat = binned_sum(prefix_rows, hedges_t).T  # (rows, columns)
        groups = group_rows(heat.shape[0], self.heatmap_rows)
        if len(groups) - 1 < heat.shape[0]:  # more units than pixel rows: sum neighbouring units
            heat = np.add.reduceat(heat, groups[:-1], axis=0)
            row_labels = (row_labels[groups[:-1]] + row_labels[groups[1:] - 1]) / 2
        if self.sign.value == "helped":
            heat = np.minimum(heat, 0.0)
        elif self.sign.value == "hurt":
            heat = np.maximum(heat, 0.0)
        out["heatmap"] = (bin_centres(hedges_t), row_labels, heat)
        return out

    # -- drawing ----------------------------------------------------------------------------------
    def update(self):
        """Recompute from the controls and update every mark in place (one message per mark)."""
        s = self.compute()
        m = self.marks
        f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)
        sign = self.sign.value
        with ExitStack() as stack:
            for mark in m.values():
                stack.enter_context(mark.hold_sync())
            for key in ("loss", "reconstructed", "residual"):
                m[key].x, m[key].y = f32(s[key][0]), f32(s[key][1])
            m["loss_points"].x, m["loss_points"].y = f32(s["loss"][0]), f32(s["loss"][1])
            for key, (x, y) in s["fractions"].items():
                shown = sign == "both" or sign == key
                m[key].x, m[key].y, m[key].visible = f32(x), f32(y), shown
                pts = m[f"{key}_points"]
                pts.x, pts.y, pts.visible = f32(x), f32(y), shown
            m["cumulative"].x, m["cumulative"].y = f32(s["cumulative"][0]), f32(s["cumulative"][1])
            self._syncing = True
            try:
                for row, key in enumerate(("helped_bars", "hurt_bars")):
                    m[key].y = f32(s["bars"][row])
                    m[key].selected = None if self.selected_layer is None else [self.selected_layer]
            finally:
                self._syncing = False
            m["histogram"].x, m["histogram"].y = f32(s["histogram"][0]), f32(s["histogram"][1])
            x, y, heat = _at_least_two(*s["heatmap"])
            limit = float(np.abs(heat).max()) or 1.0
            heatmap = m["heatmap"]
            heatmap.x, heatmap.y, heatmap.color = f32(x), f32(y), f32(heat)
            cs = heatmap.scales["color"]
            with cs.hold_sync():
                cs.min, cs.max = -limit, limit
        self._state = s
        self.summary.value = self._summary_html(s)
        heat_fig = self.figures["heatmap"]
        if self.selected_layer is None:
            heat_fig.axes[1].label = "layer (0 = " + self.layers[0] + ")"
            heat_fig.axes[1].tick_values = np.arange(len(self.layers)) if len(self.layers) <= 12 else None
            heat_fig.title = f"LCA per layer and iteration (colour ±{limit:.2e})"
        else:
            heat_fig.axes[1].label, heat_fig.axes[1].tick_values = "unit", None
            heat_fig.title = f"{self.layer.value}: LCA per unit and iteration (colour ±{limit:.2e})"

    def _summary_html(self, s) -> str:
        start, stop = s["start"], s["stop"]
        loss0, loss1 = self._loss[start], self._loss[stop]
        _labels, _, values = s["elements"]
        total = float(self.element_totals("layer", start, stop).sum())
        residual = float(self._residual_prefix[stop] - self._residual_prefix[start])
        by = self.granularity.value
        where = "all layers" if self.selected_layer is None else self.layer.value
        return (
            f'<div class="lca-summary" data-start="{start}" data-stop="{stop}" data-n="{len(values)}">'
            f"<b>iterations [{start}, {stop})</b> of {self.n_iterations} &middot; loss {loss0:.6g} &rarr; {loss1:.6g} "
            f"(change {loss1 - loss0:+.6g}) &middot; LCA sum {total:+.6g}, residual {residual:+.3g} &middot; "
            f"{html.escape(where)}, by {by}, {self.sign.value}: <b>{len(values)}</b> elements, "
            f"sum {values.sum():+.6g}</div>"
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
                "residual": (("bin",), s["residual"][1]),
                **{f"fraction_{k}": (("bin",), v[1]) for k, v in fr.items()},
                "cumulative": (("layer", "checkpoint"), s["cumulative"][1]),
                "histogram_count": (("histogram_bin",), s["histogram"][1]),
            },
            coords={
                "element": np.asarray([str(x) for x in labels]),
                "element_layer": (("element",), layer_names[owners] if len(owners) else np.zeros(0, dtype=str)),
                "layer": layer_names,
                "checkpoint": s["edges"],
                "bin": s["residual"][0],
                "histogram_bin": s["histogram"][0],
            },
            attrs={
                "start": s["start"],
                "stop": s["stop"],
                "granularity": by,
                "layer": "" if self.selected_layer is None else self.layer.value,
                "sign": self.sign.value,
                "smoothing": self.smoothing.value,
            },
        )
        return ds

    def export(self, path) -> list[str]:
        """Write what is on screen: ``.csv`` (the selected elements' LCA), ``.nc`` (:meth:`selection`),
        ``.png`` / ``.svg`` (each figure as ``<stem>_<figure><ext>``). Returns the paths.

        PNG and SVG are rendered by the browser showing the panel and arrive asynchronously: the files
        appear once the front end answers (none without a displayed panel).
        """
        path = os.fspath(path)
        stem, ext = os.path.splitext(path)
        ext = ext.lower()
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
        if ext in (".png", ".svg"):
            paths = []
            for name, fig in self.figures.items():
                target = f"{stem}_{name}{ext}"
                paths.append(target)
                writer = _file_writer(target, self.export_status)
                fig.get_png_data(writer) if ext == ".png" else fig.get_svg_data(writer)
            return paths
        raise ValueError(f"cannot export to {path!r}: use a name ending in .csv, .nc, .png or .svg")

    def _export_clicked(self):
        try:
            paths = self.export(self.export_path.value)
        except Exception as exc:  # shown in the panel: a button callback's exception would vanish
            self.export_status.value = f'<span style="color:#d73027">export failed: {html.escape(str(exc))}</span>'
            return
        if self.export_path.value.lower().endswith((".png", ".svg")):
            self.export_status.value = f"rendering {len(paths)} figures in the browser&hellip;"
        else:
            self.export_status.value = f"wrote {html.escape(paths[0])}"


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


def explore(result, **options) -> Explorer:
    """The interactive explorer of an ``LCAResult`` (an ipywidgets panel; display it or end a cell with it).

    >>> import lca_notebook as lca
    >>> panel = lca.explore(lca.LCAResult.example())
    >>> sorted(panel.figures)
    ['cumulative', 'fractions', 'heatmap', 'histogram', 'layers', 'loss']
    """
    return Explorer(result, **options)
