"""The on-disk layout of a result (zarr), opened lazily."""

from __future__ import annotations

import os

import xarray as xr

from .result import LCAResult


def open_store(path) -> LCAResult:
    """Open a zarr store written by :meth:`LCAResult.save` or ``analyze(store=...)``, lazily."""
    path = os.fspath(path)
    try:
        ds = xr.open_zarr(path, consolidated=None)
    except Exception as exc:  # zarr raises many types for a broken store; say which file, not where it broke
        raise ValueError(f"{path!r} is not a readable LCA store ({type(exc).__name__}: {exc})") from exc
    return LCAResult(ds)
