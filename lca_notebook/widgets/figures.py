"""The explorer's bqplot figures: marks, scales and axes built once; the explorer fills their data in place.

Each builder returns ``(figure, marks)``. One convention everywhere: helped (LCA < 0) is green and down (or
left), hurt (LCA > 0) red and up (or right), did not move grey; every LCA axis says which way is helped.
Colours are mid-tones that read on JupyterLab's light and dark themes (axes and text take the theme's own
colours from bqplot's CSS variables). Figures take the width they are given (``width: 100%``); margins leave
room for tick labels so no axis label is printed over them.

Tooltips that list several numbers are ipywidgets ``HTML`` filled from Python on hover (bqplot's own tooltips
show one datum's fields): see :func:`hover_columns` and :func:`hover_grid`.

>>> fig, marks = loss_figure(240)
>>> sorted(marks)
['hover', 'loss', 'reconstructed']
"""

from __future__ import annotations

import ipywidgets as widgets
import numpy as np
from bqplot import (
    Axis,
    Bars,
    ColorAxis,
    ColorScale,
    Figure,
    HeatMap,
    Label,
    LinearScale,
    Lines,
    LogScale,
    OrdinalScale,
    Scatter,
)
from bqplot.interacts import BrushIntervalSelector

HELPED, HURT, ZERO = "#1a9850", "#d73027", "#8c8c8c"
LOSS, REBUILT, RESIDUAL, MUTED = "#3b7dd8", "#d97706", "#9467bd", "#8c8c8c"
HEAT_MID = "#f2f2f2"  # the heat map's zero: light, so green and red cells stand out on either theme
# mid-tone layer colours, relative luminance 0.2-0.28: contrast >= 3 on white and on JupyterLab's dark
# background alike (the browser test measures it); no green or red, which mean helped and hurt
LAYER_COLOURS = ["#3b7dd8", "#d97706", "#9467bd", "#b07a4f", "#d6409f", "#0f8b8d", "#8a8a1e", "#6f8fb5"]
_EMPTY = np.zeros(0, dtype=np.float32)
_MARGIN = {"top": 32, "bottom": 44, "left": 74, "right": 30}
HELPED_DOWN = "↓ helped"
#: The heat map's colour bar: negative (green, helped) on its left.
COLOUR_LABEL = "LCA (← helped, hurt →)"
TOOLTIP_STYLE = {"opacity": 0.95}


def _figure(title, marks, axes, height, margin=None, min_width=340) -> Figure:
    fig = Figure(
        marks=marks,
        axes=axes,
        title=title,
        fig_margin=dict(_MARGIN, **(margin or {})),
        animation_duration=0,
        title_style={"font-size": "13px"},
        legend_location="top-right",
        legend_style={"fill-opacity": 0.0, "stroke-opacity": 0.0},
        min_aspect_ratio=0.01,
        max_aspect_ratio=100,
    )
    fig.layout = widgets.Layout(width="100%", height=f"{height}px", min_width=f"{min_width}px")
    return fig


def x_axis(scale, label="iteration", **kw) -> Axis:
    return Axis(scale=scale, label=label, label_offset="32px", tick_format="d", **kw)


def y_axis(scale, label, tick_format=".3~g", offset="56px", **kw) -> Axis:
    return Axis(
        scale=scale,
        side="left",
        label=label,
        label_offset=offset,
        tick_format=tick_format,
        **kw,
    )


def empty_label() -> Label:
    """A message in the middle of a figure, shown instead of an empty axis."""
    return Label(
        x=np.array([0.5], np.float32),
        y=np.array([0.5], np.float32),
        scales={"x": LinearScale(min=0.0, max=1.0), "y": LinearScale(min=0.0, max=1.0)},
        text=[""],
        align="middle",
        default_size=14,
        colors=[MUTED],
        visible=False,
        enable_hover=False,
    )


def hover_columns(n_columns: int = 64) -> Bars:
    """Invisible full-height columns across the plot: hovering anywhere reports a column (``index``) to
    Python, which answers with every series at that place in the mark's ``HTML`` tooltip (never resent)."""
    x = (np.arange(n_columns) + 0.5) / n_columns
    return Bars(
        x=x.astype(np.float32),
        y=np.ones(n_columns, np.float32),
        scales={"x": LinearScale(min=0.0, max=1.0), "y": LinearScale(min=0.0, max=1.0)},
        colors=[MUTED],
        opacities=[0.0] * n_columns,
        padding=0.0,
        base=0.0,
        stroke=None,
        display_legend=False,
        tooltip=_tooltip(),
        tooltip_style=TOOLTIP_STYLE,
        interactions={"hover": "tooltip"},
    )


def _tooltip() -> widgets.HTML:
    tooltip = widgets.HTML(value="", layout=widgets.Layout(min_width="160px"))
    tooltip.add_class("lca-tooltip")
    return tooltip


def hover_grid(n_columns: int, n_rows: int, size: int = 400) -> Scatter:
    """Invisible squares on a fixed ``n_rows x n_columns`` grid over the plot, in plot fractions (0..1)."""
    gx, gy = np.meshgrid((np.arange(n_columns) + 0.5) / n_columns, (np.arange(n_rows) + 0.5) / n_rows)
    return Scatter(
        x=gx.ravel().astype(np.float32),
        y=gy.ravel().astype(np.float32),
        scales={"x": LinearScale(min=0.0, max=1.0), "y": LinearScale(min=0.0, max=1.0)},
        marker="square",
        default_size=size,
        colors=[MUTED],
        opacities=[0.0],
        stroke=None,
        display_legend=False,
        tooltip=_tooltip(),
        tooltip_style=TOOLTIP_STYLE,
        interactions={"hover": "tooltip"},
    )


def loss_figure(height):
    """True loss at the checkpoints and the loss rebuilt from cumulative LCA (legend in the title)."""
    xs, ys = LinearScale(), LinearScale()
    loss = Lines(x=_EMPTY, y=_EMPTY, scales={"x": xs, "y": ys}, colors=[LOSS], stroke_width=2.5)
    recon = Lines(x=_EMPTY, y=_EMPTY, scales={"x": xs, "y": ys}, colors=[REBUILT], line_style="dashed", stroke_width=2)
    hover = hover_columns()
    axes = [x_axis(xs, label=""), y_axis(ys, f"loss ({HELPED_DOWN})")]
    title = "Loss: true (blue) and rebuilt from LCA (orange, dashed)"
    fig = _figure(title, [loss, recon, hover], axes, height, {"bottom": 22})
    return fig, {"loss": loss, "reconstructed": recon, "hover": hover}


def residual_figure(height, x_scale):
    """The residual (sum of LCA minus the loss change) per iteration, in a thin strip with the tolerance."""
    rs = LinearScale()
    residual = Lines(x=_EMPTY, y=_EMPTY, scales={"x": x_scale, "y": rs}, colors=[RESIDUAL], stroke_width=1.5)
    tol = Lines(
        x=_EMPTY,
        y=np.zeros((2, 0), np.float32),
        scales={"x": x_scale, "y": rs},
        colors=[MUTED],
        line_style="dashed",
        stroke_width=1,
    )
    axes = [x_axis(x_scale), _residual_axis(rs)]
    fig = _figure("", [residual, tol], axes, height, {"top": 6, "bottom": 40})
    return fig, {"residual": residual, "tolerance": tol}


def _residual_axis(scale) -> Axis:
    return Axis(
        scale=scale,
        side="left",
        label="residual",
        label_offset="56px",
        tick_format=".2~g",
    )


def fractions_figure(height):
    """Fractions of elements that helped, hurt or did not move over the whole run (in %); the shaded band
    is the iteration range and a drag sets it (a ``BrushIntervalSelector`` linked to the slider)."""
    xs, ys = LinearScale(), LinearScale(min=0.0, max=1.0)
    marks = {}
    for key, colour in (("helped", HELPED), ("hurt", HURT), ("zero", ZERO)):
        marks[key] = Lines(x=_EMPTY, y=_EMPTY, scales={"x": xs, "y": ys}, colors=[colour], stroke_width=2)
    brush = BrushIntervalSelector(scale=xs, color=MUTED)
    axes = [x_axis(xs, label="iteration (drag to choose the range)"), y_axis(ys, "% of elements", ".0%")]
    title = "Helped (green), hurt (red), did not move (grey)"
    fig = _figure(title, list(marks.values()), axes, height)
    fig.interaction = brush
    marks["brush"] = brush
    return fig, marks


def cumulative_figure(height, layers):
    """Cumulative LCA of each layer from the start of the range (one line a layer, legend top right)."""
    xs, ys = LinearScale(), LinearScale()
    colours = [LAYER_COLOURS[i % len(LAYER_COLOURS)] for i in range(len(layers))]
    lines = Lines(
        x=_EMPTY,
        y=np.zeros((len(layers), 0), np.float32),
        scales={"x": xs, "y": ys},
        colors=colours,
        labels=list(layers),
        display_legend=0 < len(layers) <= 10,
        stroke_width=2,
    )
    hover = hover_columns()
    axes = [x_axis(xs), y_axis(ys, f"cumulative LCA ({HELPED_DOWN})")]
    fig = _figure("Cumulative LCA per layer", [lines, hover], axes, height)
    return fig, {"cumulative": lines, "cumulative_hover": hover}


def layer_bars_figure(height, layers):
    """Helped (down, green) and hurt (up, red) LCA of each layer over the range, each layer's share of the
    loss change in its label; clicking a bar selects its layer."""
    xs, ys = OrdinalScale(domain=list(layers)), LinearScale()
    marks = {}
    tooltip = _tooltip()
    for key, colour in (("helped", HELPED), ("hurt", HURT)):
        marks[f"{key}_bars"] = Bars(
            x=list(layers),
            y=np.zeros(len(layers), np.float32),
            scales={"x": xs, "y": ys},
            colors=[colour],
            display_legend=False,
            base=0.0,
            padding=0.3,
            interactions={"click": "select", "hover": "tooltip"},
            selected_style={"stroke": MUTED, "stroke-width": "3"},
            unselected_style={"opacity": "0.45"},
            tooltip=tooltip,
            tooltip_style=TOOLTIP_STYLE,
        )
    axes = [
        Axis(scale=xs, label="layer · share of the loss change (click a bar)", label_offset="32px"),
        y_axis(ys, f"LCA in range ({HELPED_DOWN})"),
    ]
    marks["layers_empty"] = empty_label()
    title = "LCA per layer: helped (green, down), hurt (red, up)"
    return _figure(title, list(marks.values()), axes, height), marks


def heatmap_figure(height):
    """Rows (layers, or the chosen layer's units) x iterations, drawn on a canvas (``HeatMap``), with a colour
    bar. Named rows come from an ordinal axis over the same band; a hover grid reports the cell under the
    pointer (bqplot 0.13's ``HeatMap`` itself binds no data to its image, so it cannot)."""
    xs, ys = LinearScale(), LinearScale(reverse=True)
    # the cells carry LCA / limit in [-1, 1] on a fixed scale, so a new limit redraws the colour bar, not the canvas;
    # the bar has a scale of its own in LCA units
    cs = ColorScale(colors=[HELPED, HEAT_MID, HURT], mid=0.0, min=-1.0, max=1.0)
    bar = ColorScale(colors=[HELPED, HEAT_MID, HURT], mid=0.0, min=-1.0, max=1.0)
    heat = HeatMap(
        x=np.arange(2, dtype=np.float32),
        y=np.arange(2, dtype=np.float32),
        color=np.zeros((2, 2), np.float32),
        scales={"x": xs, "y": ys, "color": cs},
        null_color=HEAT_MID,
    )
    names = OrdinalScale(domain=[])
    hover = hover_grid(40, 16, size=150)
    empty = empty_label()
    axes = [
        x_axis(xs),
        Axis(scale=ys, side="left", label="unit", label_offset="46px", tick_format="d"),
        Axis(scale=names, side="left", label="layer", label_offset="62px", visible=False),
        ColorAxis(scale=bar, side="bottom", label=COLOUR_LABEL, tick_format=".2~g"),
    ]
    fig = _figure("LCA per layer and iteration", [heat, hover, empty], axes, height, {"bottom": 100, "left": 82})
    return fig, {"heatmap": heat, "heatmap_hover": hover, "heatmap_empty": empty, "heatmap_names": names}


def histogram_figure(height):
    """Histogram (computed in Python) of the selection's LCA over the range: bins left of 0 helped (green),
    right of 0 hurt (red); exact zeros are counted apart (in the title)."""
    # no mark padding on x: bqplot pads a linear x scale by half the plot over a Bars mark's bar count, so a
    # side with one bin (e.g. hurt) squeezed both marks and the axis into a spike mid-plot when the browser drew
    # the state at once (landing); the explorer already pads the domain by half a bin plus 2 %
    xs, ys, logs = LinearScale(allow_padding=False), LinearScale(min=0.0), LogScale(min=0.5)
    tooltip = _tooltip()
    marks = {}
    for key, colour in (("helped", HELPED), ("hurt", HURT)):
        marks[f"histogram_{key}"] = Bars(
            x=_EMPTY,
            y=_EMPTY,
            scales={"x": xs, "y": ys},
            colors=[colour],
            padding=0.05,
            base=0.0,
            tooltip=tooltip,
            tooltip_style=TOOLTIP_STYLE,
            interactions={"hover": "tooltip"},
        )
    marks["histogram_empty"] = empty_label()
    axes = [
        Axis(scale=xs, label="LCA in range (← helped, hurt →)", label_offset="32px", tick_format=".2~g"),
        y_axis(ys, "count", tick_format="d", offset="50px"),
    ]
    fig = _figure("Distribution of LCA", list(marks.values()), axes, height, {"left": 66})
    marks["_log_scale"] = logs  # swapped in for ``ys`` by the explorer's log-count option
    return fig, marks


def nice_ticks(lo: float, hi: float, most: int = 5, integer: bool = False) -> np.ndarray:
    """At most ``most`` round tick values in ``[lo, hi]``, 1, 2, 2.5 or 5 times a power of ten apart (whole
    numbers only when ``integer``): bqplot's own ``num_ticks`` spaces ticks evenly, at unround values.

    >>> nice_ticks(0.0395, 2.39).tolist(), nice_ticks(-0.92, 0.03).tolist()
    ([0.5, 1.0, 1.5, 2.0], [-0.8, -0.6, -0.4, -0.2, 0.0])
    """
    lo, hi = float(lo), float(hi)
    if not (np.isfinite(lo) and np.isfinite(hi)) or hi < lo:
        return np.zeros(0)
    span = hi - lo if hi > lo else max(abs(hi), 1e-30)
    base = 10.0 ** np.floor(np.log10(span / max(1, most - 1)))
    for m in (1.0, 2.0, 2.5, 5.0, 10.0, 20.0):
        step = m * base
        if integer:
            step = max(1.0, np.round(step))
        if np.floor(hi / step) - np.ceil(lo / step) + 1 <= most:
            break
    ticks = step * np.arange(np.ceil(lo / step - 1e-9), np.floor(hi / step + 1e-9) + 1)
    ticks = np.round(ticks, 12) + 0.0  # no -0.0 or 0.30000000000000004 in the labels
    return ticks.astype(np.int64) if integer else ticks


def integer_ticks(lo: float, hi: float, most: int = 6) -> np.ndarray:
    """At most ``most`` round whole-number tick values in ``[lo, hi]``.

    >>> integer_ticks(0, 3).tolist(), integer_ticks(10, 2000).tolist()
    ([0, 1, 2, 3], [500, 1000, 1500, 2000])
    """
    return nice_ticks(lo, hi, most, integer=True)


def padded(lo: float, hi: float, fraction: float = 0.04) -> tuple[float, float]:
    """A scale's domain around data in ``[lo, hi]`` with a small margin (never empty)."""
    lo, hi = float(lo), float(hi)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return 0.0, 1.0
    pad = (hi - lo) * fraction or max(abs(hi), 1e-12) * fraction or 1.0
    return lo - pad, hi + pad
