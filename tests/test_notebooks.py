"""Every example notebook runs headless, top to bottom, in a fresh kernel of this environment.

Notebooks are committed without outputs; a cell that raises fails its notebook's test with the
cell's traceback. Each is meant to finish in under 2 minutes on 2 CPU cores; the timeout below is
only a guard against a hang.
"""

import re
import time
from pathlib import Path

import pytest
from browser_utils import kernel_env, python3_kernel

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "example_notebooks"
EXPECTED = ["02_channels.ipynb", "03_paper_findings.ipynb", "04_any_loss.ipynb", "05_your_own_training.ipynb"]
PER_NOTEBOOK_TIMEOUT = 300  # seconds for the whole notebook


def _notebooks():
    return sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))


@pytest.fixture(scope="session")
def kernel_name():
    return python3_kernel()


def test_the_example_notebooks_are_all_there_and_stripped():
    names = _notebooks()
    missing = [n for n in EXPECTED if n not in names]
    assert not missing, f"missing example notebooks: {missing}"
    for name in names:
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        with_output = [
            i
            for i, c in enumerate(nb.cells)
            if c.cell_type == "code" and (c.get("outputs") or c.get("execution_count"))
        ]
        assert not with_output, (
            f"{name}: cells {with_output} were committed with outputs; clear them (Edit > Clear Outputs of All Cells)"
        )


def test_stored_kernel_metadata_is_what_jupyterlab_writes_so_opening_does_not_rewrite_them(kernel_name):
    """JupyterLab sets a notebook's kernelspec and language_info from the kernel it attaches; when they differ
    from the stored ones the notebook is marked changed and autosaved, rewriting a tracked file. Stored here:
    the values of this environment's kernel (checked in a real browser by tests/test_landing.py's notebook)."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import start_new_kernel

    spec = KernelSpecManager().get_kernel_spec(kernel_name)
    km, kc = start_new_kernel(kernel_name=kernel_name, env=kernel_env())
    try:
        language_info = kc.kernel_info(reply=True, timeout=60)["content"]["language_info"]
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    expected = {
        "kernelspec": {"display_name": spec.display_name, "language": spec.language, "name": kernel_name},
        "language_info": language_info,
    }
    for name in _notebooks():
        metadata = nbformat.read(NOTEBOOKS / name, as_version=4).metadata
        assert {k: metadata.get(k) for k in expected} == expected, (
            f"{name}: stored kernel metadata differ from what JupyterLab writes on opening it"
        )


def _texts(nb) -> list[str]:
    out = []
    for c in nb.cells:
        for o in c.get("outputs", []):
            out.append(o.get("text", "") + o.get("data", {}).get("text/plain", ""))
    return out


def _check_outputs(name, nb):
    """What each notebook prints reads right: plain names, one explorer, true equations."""
    texts = _texts(nb)
    assert not [t for t in texts if "np.str_(" in t], f"{name} prints numpy string reprs instead of names"
    explorers = [
        o
        for c in nb.cells
        for o in c.get("outputs", [])
        if "application/vnd.jupyter.widget-view+json" in o.get("data", {})
        and re.match(r"(Explorer\(|<LCAResult)", o["data"].get("text/plain", ""))
    ]
    assert len(explorers) <= 1, f"{name} shows the explorer {len(explorers)} times"
    for t in texts:  # "loss change C = sum of LCA S - residual R": the residual is S - C
        m = re.search(r"loss change:? (\S+) = sum of LCA:? (\S+) ([-+]) residual:? (\S+)", t)
        if m:
            change, total, sign, residual = float(m[1]), float(m[2]), m[3], float(m[4])
            assert sign == "-" and change == pytest.approx(total - residual, abs=2e-4), m[0]


@pytest.mark.timeout(PER_NOTEBOOK_TIMEOUT + 60)
@pytest.mark.parametrize("name", _notebooks())
def test_notebook_runs(name, kernel_name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name=kernel_name,
        timeout=PER_NOTEBOOK_TIMEOUT,
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    # The examples' models are tiny: one thread is fastest, and threads oversubscribed by other work
    # on the same cores slow small convolutions down many times over.
    started = time.perf_counter()
    client.execute(env=kernel_env())
    print(f"{name}: {time.perf_counter() - started:.1f} s")
    errors = [
        o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"
    ]
    assert not errors, f"{name}: {errors[0].get('ename')}: {errors[0].get('evalue')}"
    _check_outputs(name, nb)
