"""glibc keeps freed blocks for reuse while the engine runs, and gives them back afterwards (counted in page
faults: a block mapped afresh faults once per 4 kB page it touches, one reused from the heap does not).

Each case runs in a fresh process, and whether a block is mapped afresh is checked on a 200 MB one: glibc serves a
block from a free chunk already inside its heap whatever its settings, and a long process (the test suite), or
`kept`'s own 48 MB blocks, may leave such chunks behind (malloc_trim gives their pages back, not the chunks)."""

import json
import os
import subprocess
import sys

import pytest

from lca_notebook import heap

pytestmark = pytest.mark.skipif(heap._libc() is None, reason="glibc's allocator only")

# 48 MB: over the 32 MB that glibc's mmap threshold reaches at most on its own, so outside `kept` each such
# block is a fresh mmap. torch (not numpy, which asks for huge pages: a fault per 2 MB) allocates it.
N = 12 << 20
PAGES = N * 4 // 4096
BIG = 50 << 20  # 200 MB: more than every free chunk a fresh process and kept's blocks can leave in the heap
BIG_PAGES = BIG * 4 // 4096

CASES = """
import json, resource, sys
import torch
from lca_notebook import heap

N, BIG = int(sys.argv[2]), int(sys.argv[3])

def faults_of_touching_twice(n=N):
    # page faults of the second of two same-sized blocks, each filled and freed
    torch.empty(n).fill_(1.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(n).fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1])

out = {}
case = sys.argv[1]
if case == "kept":
    with heap.kept("cpu"):
        out["inside"] = [faults_of_touching_twice() for _ in range(3)]  # the first may grow the heap
        out["held"] = resident()
    out["given_back"] = out.pop("held") - resident()
    out["outside"] = [faults_of_touching_twice(BIG) for _ in range(2)]
elif case == "cuda":
    with heap.kept("cuda:0"):
        out["inside"] = [faults_of_touching_twice(BIG) for _ in range(2)]
elif case == "raises":
    try:
        with heap.kept("cpu"):
            faults_of_touching_twice()
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        out["after"] = [faults_of_touching_twice(BIG) for _ in range(2)]
print(json.dumps(out))
"""


def _environment() -> dict[str, str]:
    """This process's environment without glibc malloc settings: a child starts with glibc's defaults."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}


def _run(case: str, tmp_path, **env) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CASES, case, str(N), str(BIG)],
        env=_environment() | env, capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_inside_kept_a_freed_block_is_reused_and_afterwards_it_is_given_back(tmp_path):
    out = _run("kept", tmp_path)
    assert out["inside"][-1] < PAGES // 10, out
    assert out["given_back"] > PAGES // 2, out  # malloc_trim on the way out: the kept pages leave the process
    assert min(out["outside"]) > BIG_PAGES // 2, out  # and glibc's thresholds are back: big blocks mapped afresh


def test_kept_leaves_other_devices_and_the_users_own_settings_alone(tmp_path):
    assert min(_run("cuda", tmp_path)["inside"]) > BIG_PAGES // 2
    # the user's MALLOC_TOP_PAD_ (any glibc malloc variable) wins: kept changes nothing, blocks stay mapped afresh
    assert min(_run("kept", tmp_path, MALLOC_TOP_PAD_="131072")["inside"]) > PAGES // 2


def test_the_users_settings_are_those_the_process_started_with(tmp_path):
    """glibc reads MALLOC_* once, at startup: a variable set later (Dask's ``distributed`` does, on import) is
    not the process's setting; one set before it started is."""
    code = (
        "import os; from lca_notebook import heap; os.environ['MALLOC_TRIM_THRESHOLD_'] = '65536'; "
        "print(heap._user_set())"
    )
    env = _environment()
    for extra, expected in (({}, "False"), ({"MALLOC_TOP_PAD_": "131072"}, "True"),
                            ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=65536"}, "True")):  # fmt: skip
        out = subprocess.run(
            [sys.executable, "-c", code], env=env | extra, capture_output=True, text=True, cwd=tmp_path
        )
        assert out.stdout.strip() == expected, (extra, out.stderr)


def test_kept_settles_even_when_the_body_raises(tmp_path):
    assert min(_run("raises", tmp_path)["after"]) > BIG_PAGES // 2
