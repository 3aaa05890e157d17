"""The explorer's bqplot figures: marks and scales built once, with explicit sizes; data comes later.

Each builder returns ``(figure, marks)``; the explorer fills the marks' data in place. Colours are the
same everywhere: green helped (LCA < 0), red hurt (LCA > 0), grey did not move.

>>> fig, marks = loss_figure(400, 240)
>>> sorted(marks)
['loss', 'loss_points', 'reconstructed', 'residual']
"""

from __future__ import annotations

import numpy as np
from bqplot import Axis, Bars, ColorScale, Figure, HeatMap, LinearScale, Lines, OrdinalScale, Scatter, Tooltip

HELPED, HURT, ZERO = "#1a9850", "#d73027", "#9e9e9e"
LAYER_COLOURS = [
    "#1f77b4",
    "#ff7f0e",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#bcbd22",
    "#7f7f7f",
    "#2ca02c",
    "#d62728",
]
_EMPTY = np.zeros(0, dtype=np.float32)
_MARGIN = {"top": 36, "bottom": 44, "left": 62, "right": 20}


def _figure(title, marks, axes, width, height, margin=None) -> Figure:
    fig = Figure(
        marks=marks,
        axes=axes,
        title=title,
        fig_margin=dict(_MARGIN, **(margin or {})),
        animation_duration=0,
        legend_location="top-right",
        title_style={"font-size": "13px"},
    )
    fig.layout.width, fig.layout.height = f"{width}px", f"{height}px"
    return fig


def _hover_points(x_scale, y_scale, colour, name, x_label, y_format=".6g"):
    """Invisible markers on a line's points whose tooltip gives the exact value under the pointer
    (bqplot lines only report their name on hover)."""
    return Scatter(
        x=_EMPTY,
        y=_EMPTY,
        scales={"x": x_scale, "y": y_scale},
        colors=[colour],
        default_size=24,
        opacities=[0.0],
        stroke=None,
        display_legend=False,
        labels=[name],
        tooltip=Tooltip(fields=["x", "y"], formats=[".0f", y_format], labels=[x_label, name]),
    )


def loss_figure(width, height):
    """True loss, the loss rebuilt from cumulative LCA, and the residual per plotted bin (right axis)."""
    xs, ys, rs = LinearScale(), LinearScale(), LinearScale()
    loss = Lines(
        x=_EMPTY,
        y=_EMPTY,
        scales={"x": xs, "y": ys},
        colors=["black"],
        labels=["true loss"],
        display_legend=True,
        stroke_width=2,
    )
    recon = Lines(
        x=_EMPTY,
        y=_EMPTY,
        scales={"x": xs, "y": ys},
        colors=["#1f77b4"],
        labels=["rebuilt from LCA"],
        display_legend=True,
        line_style="dashed",
        stroke_width=2,
    )
    residual = Lines(
        x=_EMPTY,
        y=_EMPTY,
        scales={"x": xs, "y": rs},
        colors=["#ff7f0e"],
        labels=["residual (per bin)"],
        display_legend=True,
        opacities=[0.8],
    )
    points = _hover_points(xs, ys, "black", "loss", "checkpoint")
    axes = [
        Axis(scale=xs, label="checkpoint (iteration)"),
        Axis(scale=ys, side="left", label="loss", tick_format=".3g"),
        Axis(scale=rs, side="right", label="residual", tick_format=".1e", label_offset="-6px", color="#ff7f0e"),
    ]
    fig = _figure("Loss: true vs rebuilt from LCA", [loss, recon, residual, points], axes, width, height, {"right": 70})
    return fig, {"loss": loss, "reconstructed": recon, "residual": residual, "loss_points": points}


def fractions_figure(width, height):
    """Fractions of elements that helped, hurt or did not move, per iteration."""
    xs, ys = LinearScale(), LinearScale(min=0.0, max=1.0)
    marks = {}
    for key, colour in (("helped", HELPED), ("hurt", HURT), ("zero", ZERO)):
        marks[key] = Lines(
            x=_EMPTY,
            y=_EMPTY,
            scales={"x": xs, "y": ys},
            colors=[colour],
            labels=[key],
            display_legend=True,
            stroke_width=2,
        )
        marks[f"{key}_points"] = _hover_points(xs, ys, colour, key, "iteration", ".4f")
    axes = [Axis(scale=xs, label="iteration"), Axis(scale=ys, side="left", label="fraction", tick_format=".0%")]
    fig = _figure("Helping / hurting fractions", list(marks.values()), axes, width, height)
    return fig, marks


def cumulative_figure(width, height, layers):
    """Cumulative LCA of each layer from the start of the chosen range (one line a layer)."""
    xs, ys = LinearScale(), LinearScale()
    colours = [LAYER_COLOURS[i % len(LAYER_COLOURS)] for i in range(len(layers))]
    lines = Lines(
        x=_EMPTY,
        y=np.zeros((len(layers), 0), np.float32),
        scales={"x": xs, "y": ys},
        colors=colours,
        labels=list(layers),
        display_legend=True,
        stroke_width=2,
        tooltip=Tooltip(fields=["name"], labels=["layer"]),
    )
    axes = [Axis(scale=xs, label="iteration"), Axis(scale=ys, side="left", label="cumulative LCA", tick_format=".3g")]
    return _figure("Cumulative LCA per layer", [lines], axes, width, height), {"cumulative": lines}


def layer_bars_figure(width, height, layers):
    """Helped and hurt LCA of each layer over the range; clicking a bar selects its layer.

    Two 1-D marks on the same x: helped bars go down from 0, hurt bars up, so they never overlap
    (bqplot's grouped Bars do not draw 2-D float32 data)."""
    xs, ys = OrdinalScale(domain=list(layers)), LinearScale()
    marks = {}
    for key, colour in (("helped", HELPED), ("hurt", HURT)):
        marks[f"{key}_bars"] = Bars(
            x=list(layers),
            y=np.zeros(len(layers), np.float32),
            scales={"x": xs, "y": ys},
            colors=[colour],
            labels=[key],
            display_legend=False,
            base=0.0,
            padding=0.3,
            interactions={"click": "select", "hover": "tooltip"},
            selected_style={"stroke": "black", "stroke-width": "2"},
            unselected_style={"opacity": "0.55"},
            tooltip=Tooltip(fields=["x", "y"], formats=["", ".6g"], labels=["layer", f"LCA {key}"]),
        )
    axes = [
        Axis(scale=xs, label="layer (click a bar to choose it)"),
        Axis(scale=ys, side="left", label="LCA in range", tick_format=".3g"),
    ]
    title = "LCA per layer in the range (green helped, red hurt)"  # one legend per mark would overlap
    return _figure(title, list(marks.values()), axes, width, height), marks


def heatmap_figure(width, height):
    """Units (neurons or channels) x iterations of the chosen layer, drawn on a canvas (``HeatMap``)."""
    xs, ys = LinearScale(), LinearScale(reverse=True)
    cs = ColorScale(colors=[HELPED, "#ffffff", HURT], mid=0.0, min=-1.0, max=1.0)  # its range goes in the title
    heat = HeatMap(
        x=np.arange(2, dtype=np.float32),
        y=np.arange(2, dtype=np.float32),
        color=np.zeros((2, 2), np.float32),
        scales={"x": xs, "y": ys, "color": cs},
        null_color="#ffffff",
    )
    axes = [
        Axis(scale=xs, label="iteration"),
        Axis(scale=ys, side="left", label="unit", tick_format="d"),
    ]
    fig = _figure("LCA per unit and iteration", [heat], axes, width, height)
    return fig, {"heatmap": heat}


def histogram_figure(width, height):
    """Histogram (computed in Python) of the LCA of the selection's elements over the range."""
    xs, ys = LinearScale(), LinearScale(min=0.0)
    bars = Bars(
        x=_EMPTY,
        y=_EMPTY,
        scales={"x": xs, "y": ys},
        colors=["#4c72b0"],
        padding=0.05,
        tooltip=Tooltip(fields=["x", "y"], formats=[".4g", ".0f"], labels=["LCA (bin centre)", "count"]),
    )
    axes = [
        Axis(scale=xs, label="LCA in range", tick_format=".2g", num_ticks=5),
        Axis(scale=ys, side="left", label="count", tick_format="d"),
    ]
    return _figure("Distribution of LCA", [bars], axes, width, height), {"histogram": bars}
