"""glibc's allocator settings, for the engine's loop and Dask's workers (no-ops where the C library is not glibc).

PyTorch allocates every gradient and activation with ``malloc``. In its default, adaptive mode glibc serves a
block over its mmap threshold (at most 32 MB) with a fresh ``mmap`` and hands the top of its heap back to the
system whenever more than twice that is free there. A model whose tensors pass 32 MB (a 3,200 x 3,200 layer:
41 MB) then gets fresh pages for them at every gradient: measured on a 10.5M-parameter MLP, ``analyze``'s
gradients took 10,000-44,000 page faults each (1-9 us a page on a VM) where a plain loop of gradients took none,
and ``analyze`` ran 1.09x that loop, 1.03x with the heap kept by MALLOC_* variables (benchmarks/results.md).
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["kept", "tune_worker"]

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MAX = 2**31 - 1  # mallopt takes an int
#: What glibc's adaptive mode settles at once a process has freed a tensor of 32 MB or more: its mmap threshold
#: rises to the size of a freed mapped block, up to 32 MB, and the trim threshold to twice that.
_SETTLED = {_M_MMAP_THRESHOLD: 32 << 20, _M_TRIM_THRESHOLD: 64 << 20, _M_TOP_PAD: 128 << 10}
#: The user's own settings, which win: then this module changes nothing.
_USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


@functools.cache
def _libc():
    """glibc, or None elsewhere (musl, macOS, Windows)."""
    try:
        if not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"):
            return None
        libc = ctypes.CDLL(None)
        libc.mallopt.argtypes, libc.malloc_trim.argtypes = [ctypes.c_int, ctypes.c_int], [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError, ValueError):  # no confstr (Windows) or no such name, no such function
        return None


def _set(settings: dict[int, int]):
    libc = _libc()
    for option, value in settings.items() if libc is not None else ():
        libc.mallopt(option, value)


@functools.cache
def _user_set() -> bool:
    """Whether the process started with glibc malloc settings of its own. Read from /proc/self/environ, the
    environment glibc read at startup: ``os.environ`` may have changed since (importing Dask's ``distributed``
    sets ``MALLOC_TRIM_THRESHOLD_`` there for its workers, which this process never applied)."""
    try:
        with open("/proc/self/environ", "rb") as f:
            start = dict(v.partition(b"=")[::2] for v in f.read().split(b"\0") if v)
    except OSError:
        return True  # unknown: leave the allocator alone
    return any(v.encode() in start for v in _USER_SETTINGS) or b"glibc.malloc." in start.get(b"GLIBC_TUNABLES", b"")


@contextmanager
def kept(device) -> Iterator[None]:
    """Inside: glibc keeps what is freed for the next gradient (no mmap threshold, no trimming). On the way out:
    the free memory goes back to the system (``malloc_trim``) and the settings are those glibc's adaptive mode
    settles at in a PyTorch process (mmap threshold 32 MB, trim threshold 64 MB: the adaptive mode cannot be
    switched back on). Nothing happens off the CPU, off glibc, or when the user set glibc's malloc variables
    (``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TOP_PAD_``, ``GLIBC_TUNABLES``): theirs win.
    """
    if str(device).split(":")[0] != "cpu" or _user_set() or _libc() is None:
        yield
        return
    _set({_M_MMAP_THRESHOLD: _MAX, _M_TRIM_THRESHOLD: _MAX, _M_TOP_PAD: 256 << 20})
    try:
        yield
    finally:
        _set(_SETTLED)
        _libc().malloc_trim(0)


def tune_worker():
    """In a Dask worker: undo the ``MALLOC_TRIM_THRESHOLD_=65536`` that Dask's nanny starts it with.

    That setting also pins glibc's mmap threshold at 128 kB, so every activation and gradient tensor is a fresh
    mmap, page-faulted in and unmapped again: autograd on the digits CNN ran 2.5x slower in a worker than in a
    plain process (benchmarks/bench_distributed.py). A worker's RSS then stays nearer its peak instead.
    """
    _set({_M_MMAP_THRESHOLD: 32 << 20, _M_TRIM_THRESHOLD: 256 << 20})
