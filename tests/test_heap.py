"""glibc keeps freed blocks for reuse while the engine runs, and gives them back afterwards (counted in page
faults: a block mapped afresh faults once per 4 kB page it touches, one reused from the heap does not)."""

import os
import resource
import subprocess
import sys

import pytest
import torch

from lca_notebook import heap

pytestmark = pytest.mark.skipif(heap._libc() is None, reason="glibc's allocator only")

# 48 MB: over the 32 MB that glibc's mmap threshold reaches at most on its own, so outside `kept` each such
# block is a fresh mmap. torch (not numpy, which asks for huge pages: a fault per 2 MB) allocates it.
N = 12 << 20


def _faults_of_touching_twice() -> int:
    """Page faults of the second of two same-sized blocks, each filled and freed."""
    torch.empty(N).fill_(1.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(N).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_inside_kept_a_freed_block_is_reused_and_outside_it_is_mapped_afresh():
    pages = N * 4 // 4096
    with heap.kept("cpu"):
        inside = [_faults_of_touching_twice() for _ in range(3)]  # the first may grow the heap
    outside = [_faults_of_touching_twice() for _ in range(2)]
    assert inside[-1] < pages // 10, inside
    assert min(outside) > pages // 2, outside


def test_kept_leaves_the_users_own_settings_and_other_devices_alone(monkeypatch):
    pages = N * 4 // 4096
    with heap.kept("cuda:0"):
        assert _faults_of_touching_twice() > pages // 2
    monkeypatch.setattr(heap, "_user_set", lambda: True)
    with heap.kept("cpu"):
        assert _faults_of_touching_twice() > pages // 2


def test_the_users_settings_are_those_the_process_started_with(tmp_path):
    """glibc reads MALLOC_* once, at startup: a variable set later (Dask's ``distributed`` does, on import) is
    not the process's setting; one set before it started is."""
    code = (
        "import os; from lca_notebook import heap; os.environ['MALLOC_TRIM_THRESHOLD_'] = '65536'; "
        "print(heap._user_set())"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    for extra, expected in (({}, "False"), ({"MALLOC_TOP_PAD_": "131072"}, "True"),
                            ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=65536"}, "True")):  # fmt: skip
        out = subprocess.run(
            [sys.executable, "-c", code], env=env | extra, capture_output=True, text=True, cwd=tmp_path
        )
        assert out.stdout.strip() == expected, (extra, out.stderr)


def test_kept_settles_even_when_the_body_raises():
    with pytest.raises(KeyboardInterrupt), heap.kept("cpu"):
        raise KeyboardInterrupt
    assert _faults_of_touching_twice() > N * 4 // 4096 // 2
