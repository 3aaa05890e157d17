"""The README's main job, `python -m lca_notebook`, run as a new user runs it: the venv's python called
directly (its bin/ not on PATH), from a directory that must stay untouched: training, LCA, summary, the run
folder (result + notebook), then JupyterLab serving that folder with the notebook already run in its kernel.

The browser's view of the landing is tests/test_landing.py."""

import json
import os
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from browser_utils import start_main_job, stop_main_job, wait_for_url

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "JUPYTER_PATH", "CI")}
    env["PATH"] = "/usr/bin:/bin"  # as after `bash .ci/setup` with the venv not activated
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def _tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_help_reads_whole_and_names_every_option(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "lca_notebook", "--help"],
        cwd=tmp_path,
        env=_env(COLUMNS="100"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for option in ("--out DIR", "--steps", "--no-lab", "--no-browser", "--port"):
        assert option in text, f"--help does not mention {option}:\n{text}"
    # the whole description, not only its first line: what the run folder holds and how to stop
    for words in ("~/lca_runs/", "digits_mlp.nc", "explorer.ipynb", "Ctrl-C", "examples:"):
        assert words in text, f"--help does not say {words!r}:\n{text}"
    assert max(len(line) for line in text.splitlines()) <= 110
    assert _tree(tmp_path) == []


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_no_lab_saves_the_run_folder_under_home_and_nothing_where_it_starts(tmp_path):
    """No --out: the run folder is under ~/lca_runs; the notebook opens the result by absolute path."""
    nbformat = pytest.importorskip("nbformat")
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    out = subprocess.run(
        [sys.executable, "-m", "lca_notebook", "--no-lab", "--steps", "4"],
        cwd=cwd,
        env=_env(HOME=str(home)),
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert _tree(cwd) == [], "the job wrote into the directory it was started from"
    runs = list((home / "lca_runs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("digits_mlp-"), runs
    run = runs[0]
    assert sorted(p.name for p in run.iterdir()) == ["digits_mlp.nc", "explorer.ipynb"]
    assert "4 iterations x 17,226 parameters" in out.stdout
    hint = f"lca_notebook.open({str(run / 'digits_mlp.nc')!r})"
    assert hint in out.stdout

    nb = nbformat.read(run / "explorer.ipynb", as_version=4)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert f"lca.open({str(run / 'digits_mlp.nc')!r})" in code  # absolute: works wherever the kernel runs
    # the notebook's own code, run in a fresh interpreter started elsewhere, opens this run
    probe = (
        "import lca_notebook as lca\n"
        f"r = lca.open({str(run / 'digits_mlp.nc')!r})\n"
        "print(r.n_iterations, sorted(set(r.dataset['layer'].values.tolist())))"
    )
    opened = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert opened.stdout.split() == ["4", "['fc1',", "'fc2',", "'fc3']"], opened.stderr

    # Run again into that same folder (--out): the job replaces its own result, and nothing else is there.
    again = subprocess.run(
        [sys.executable, "-m", "lca_notebook", "--no-lab", "--steps", "3", "--out", str(run)],
        cwd=cwd, env=_env(HOME=str(home)), capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert again.returncode == 0, again.stdout + again.stderr
    assert "3 iterations x 17,226 parameters" in again.stdout
    assert sorted(p.name for p in run.iterdir()) == ["digits_mlp.nc", "explorer.ipynb"]

    # A folder holding a notebook of the user's under that name: refused before any training, the notebook kept.
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "explorer.ipynb").write_text('{"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}')
    refused = subprocess.run(
        [sys.executable, "-m", "lca_notebook", "--no-lab", "--steps", "3", "--out", str(theirs)],
        cwd=cwd, env=_env(HOME=str(home)), capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert refused.returncode == 2 and "is not a notebook this job wrote" in refused.stderr, refused.stderr
    assert sorted(p.name for p in theirs.iterdir()) == ["explorer.ipynb"]
    assert "iterations x" not in refused.stdout  # nothing was trained
    # ... and so are a file of the result's name that is not a result, a log of theirs, and a port out of range
    (theirs / "explorer.ipynb").unlink()
    for name, text, options, says in (
        ("digits_mlp.nc", "hello", ["--no-lab"], "is not an LCA result this job wrote"),
        ("jupyterlab.log", "mine", ["--no-browser"], "is not a log this job wrote"),
        (None, None, ["--port", "70000"], "--port must be a port number from 1 to 65535, got 70000"),
    ):
        if name:
            (theirs / name).write_text(text)
        refused = subprocess.run(
            [sys.executable, "-m", "lca_notebook", "--steps", "3", "--out", str(theirs), *options],
            cwd=cwd, env=_env(HOME=str(home)), capture_output=True, text=True, timeout=280,
        )  # fmt: skip
        assert refused.returncode == 2 and says in refused.stderr, refused.stderr
        assert "iterations x" not in refused.stdout and "Traceback" not in refused.stderr
        if name:
            assert (theirs / name).read_text() == text
            (theirs / name).unlink()
    with socket.socket() as taken:  # a port in use: said before training, not as JupyterLab's traceback after it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        refused = subprocess.run(
            [sys.executable, "-m", "lca_notebook", "--steps", "3", "--out", str(theirs), "--port", port],
            cwd=cwd, env=_env(HOME=str(home)), capture_output=True, text=True, timeout=280,
        )  # fmt: skip
    assert refused.returncode == 2 and f"port {port} on 127.0.0.1 is not free" in refused.stderr, refused.stderr


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_main_job_serves_its_run_already_executed_in_the_notebooks_kernel(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    run = tmp_path / "run"
    proc, lines = start_main_job(["--steps", "30", "--out", str(run)], cwd=tmp_path, env=_env())
    seen: list[str] = []
    try:
        url = wait_for_url(lines, seen)
        text = "".join(seen)
        assert "30 iterations x 17,226 parameters" in text and "LCA per layer" in text
        assert url.startswith("http://127.0.0.1:") and "/lab/tree/explorer.ipynb?token=" in url
        with urllib.request.urlopen(url, timeout=60) as response:
            assert response.status == 200
        base, token = url.split("/lab/", 1)[0], url.split("token=", 1)[1]

        # the notebook on disk was run: its explorer output names a widget whose state is saved with it
        nb = nbformat.read(run / "explorer.ipynb", as_version=4)
        views = [
            o["data"][WIDGET_VIEW]["model_id"]
            for c in nb.cells
            for o in c.get("outputs", [])
            if WIDGET_VIEW in o.get("data", {})
        ]
        assert len(views) == 1, "one explorer, shown once"
        state = nb.metadata["widgets"][WIDGET_STATE]["state"]
        assert views[0] in state and state[views[0]]["model_name"] == "VBoxModel"
        bqplot_figures = [m for m in state.values() if m["model_name"] == "FigureModel"]
        assert len(bqplot_figures) >= 6  # the explorer's figures, drawable from the saved state alone
        assert not [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]

        # ... in the kernel of the notebook's session, the one JupyterLab attaches when the URL is opened
        with urllib.request.urlopen(f"{base}/api/sessions?token={token}", timeout=30) as response:
            sessions = json.load(response)
        assert [s["path"] for s in sessions] == ["explorer.ipynb"]
        assert sessions[0]["kernel"]["execution_state"] in ("idle", "busy")
        port = int(base.rsplit(":", 1)[1])
    finally:
        code = stop_main_job(proc)
    rest = "".join(seen) + "".join(iter(lambda: lines.get(timeout=30) or "", ""))
    assert code == 0, rest
    assert not _port_open(port), "JupyterLab still answers after Ctrl-C"
    assert f"cd {run} && " in rest and "-m jupyterlab explorer.ipynb" in rest  # how to open the run again
    assert _tree(tmp_path) == sorted(["run", *(f"run/{p}" for p in _tree(run))])  # nothing beside the run folder
