"""Every example notebook runs headless, top to bottom, in a fresh kernel of this environment.

Notebooks are committed without outputs; a cell that raises fails its notebook's test with the
cell's traceback. Each is meant to finish in under 2 minutes on 2 CPU cores; the timeout below is
only a guard against a hang.
"""

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
