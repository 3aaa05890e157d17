"""The IPython extension: ``%load_ext lca_notebook``, ``%%lca_record``, results displayed as the explorer.

In-process tests drive a real IPython shell; the card's flow runs in a real kernel through nbclient.
"""

import os

import numpy as np
import pytest
import torch
from browser_utils import kernel_env, python3_kernel

import lca_notebook
from lca_notebook.record import Recorder

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


@pytest.fixture
def shell():
    from IPython.core.interactiveshell import InteractiveShell

    ip = InteractiveShell.instance()
    yield ip
    ip.run_line_magic("unload_ext", "lca_notebook") if "lca_notebook" in ip.extension_manager.loaded else None
    for name in ("model", "opt", "x", "y", "traj", "trajectory", "boom"):
        ip.user_ns.pop(name, None)


def _run(ip, code):
    res = ip.run_cell(code)
    if res.error_before_exec or res.error_in_exec:
        raise res.error_before_exec or res.error_in_exec
    return res.result


def test_load_ext_is_idempotent_and_unload_removes_everything(shell):
    shell.run_line_magic("load_ext", "lca_notebook")
    shell.run_line_magic("reload_ext", "lca_notebook")  # loading again changes nothing
    shell.extension_manager.load_extension("lca_notebook")
    assert shell.user_ns["lca"] is lca_notebook
    assert "lca_record" in shell.magics_manager.magics["cell"]
    data, _ = shell.display_formatter.format(lca_notebook.LCAResult.example())
    assert WIDGET_MIME in data and data["text/plain"].startswith("<LCAResult")
    from ipywidgets.widgets.widget import _instances

    shown = _instances[data[WIDGET_MIME]["model_id"]]
    assert isinstance(shown, lca_notebook.widgets.Explorer)

    shell.run_line_magic("unload_ext", "lca_notebook")
    assert "lca" not in shell.user_ns
    assert "lca_record" not in shell.magics_manager.magics["cell"]
    data, _ = shell.display_formatter.format(lca_notebook.LCAResult.example())
    assert WIDGET_MIME not in data
    shell.run_line_magic("load_ext", "lca_notebook")  # and it loads again after unloading
    assert shell.user_ns["lca"] is lca_notebook


def _setup_model(ip):
    torch.manual_seed(0)
    ip.user_ns.update(model=torch.nn.Linear(4, 3), x=torch.randn(32, 4), y=torch.randint(0, 3, (32,)))
    ip.user_ns["opt"] = torch.optim.SGD(ip.user_ns["model"].parameters(), lr=0.1)
    return {k: v.clone() for k, v in ip.user_ns["model"].state_dict().items()}


TRAIN = """
for _ in range(5):
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
"""


def test_lca_record_records_the_cells_training_loop(shell):
    shell.run_line_magic("load_ext", "lca_notebook")
    start = _setup_model(shell)
    shell.user_ns["torch"] = torch
    shell.run_cell_magic("lca_record", "model opt --every 2 --name traj", TRAIN)
    rec = shell.user_ns["traj"]
    assert isinstance(rec, Recorder)
    assert rec.steps == [0, 2, 4, 5]
    for k, v in start.items():
        torch.testing.assert_close(rec[0][k], v)
    for k, v in shell.user_ns["model"].state_dict().items():
        torch.testing.assert_close(rec[-1][k], v)
    # the recorder is a trajectory for analyze: its LCA sums to the loss change (small residual)
    result = lca_notebook.analyze(shell.user_ns["model"], (shell.user_ns["x"], shell.user_ns["y"]), rec, progress=False)
    assert result.n_iterations == 3
    assert float(np.abs(result.residual.values).max()) < 1e-3


def test_lca_record_default_name_and_store_path(shell, tmp_path):
    shell.run_line_magic("load_ext", "lca_notebook")
    _setup_model(shell)
    shell.user_ns["torch"] = torch
    store = tmp_path / "a folder" / "run.zarr"  # quoted, as the path has a space: the quotes are not the path's
    shell.run_cell_magic("lca_record", f'model opt --to "{store}"', TRAIN)
    rec = shell.user_ns["trajectory"]
    assert rec.steps == [0, 1, 2, 3, 4, 5]
    assert store.exists()
    from_disk = lca_notebook.analyze(
        shell.user_ns["model"], (shell.user_ns["x"], shell.user_ns["y"]), str(store), progress=False
    )
    in_mem = lca_notebook.analyze(shell.user_ns["model"], (shell.user_ns["x"], shell.user_ns["y"]), rec, progress=False)
    np.testing.assert_allclose(from_disk.lca.values, in_mem.lca.values)
    # recording there again: refused with the magic's own option named, which then replaces it
    with pytest.raises(ValueError, match=r"already holds a recorded trajectory; add --overwrite to replace it"):
        shell.run_cell_magic("lca_record", f'model opt --to "{store}"', TRAIN)
    shell.run_cell_magic("lca_record", f'model opt --to "{store}" --overwrite --every 5', TRAIN)
    assert shell.user_ns["trajectory"].steps == [0, 5]


def test_lca_record_keeps_what_was_recorded_when_the_loop_fails(shell):
    shell.run_line_magic("load_ext", "lca_notebook")
    _setup_model(shell)
    shell.user_ns["torch"] = torch
    failing = TRAIN.replace("    opt.step()", "    opt.step()\n    if _ == 2: raise RuntimeError('boom')")
    res = shell.run_cell("%%lca_record model opt\n" + failing)
    assert isinstance(res.error_in_exec, RuntimeError)
    rec = shell.user_ns["trajectory"]  # bound before the loop ran
    assert isinstance(rec, Recorder) and len(rec) >= 4  # theta_0 and the three completed steps
    for k, v in shell.user_ns["model"].state_dict().items():
        torch.testing.assert_close(rec[-1][k], v)


def test_lca_record_names_an_undefined_model(shell):
    shell.run_line_magic("load_ext", "lca_notebook")
    _setup_model(shell)
    res = shell.run_cell("%%lca_record modle opt\npass")
    assert isinstance(res.error_in_exec, NameError)
    assert "modle" in str(res.error_in_exec) and "model" in str(res.error_in_exec)


CARD = [
    "%load_ext lca_notebook",
    """import torch
from lca_notebook import models
x, y = models.digits_data()
data = (x, y)
model = models.mlp(seed=0, hidden=(16,))
opt = torch.optim.SGD(model.parameters(), lr=0.1)""",
    """%%lca_record model opt
for step in range(20):
    batch = torch.arange(step * 64, (step + 1) * 64) % len(x)
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
    opt.step()""",
    "lca.analyze(model, data, trajectory)",  # the card, word for word (a tqdm bar shows while it runs)
]


@pytest.mark.timeout(300)
def test_the_cards_flow_in_a_real_kernel_ends_with_the_explorer():
    pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    from nbformat.v4 import new_code_cell, new_notebook

    nb = new_notebook(cells=[new_code_cell(src) for src in CARD])
    client = nbclient.NotebookClient(
        nb, kernel_name=python3_kernel(), timeout=240, resources={"metadata": {"path": os.getcwd()}}
    )
    with client.setup_kernel(env=kernel_env()):
        for i, cell in enumerate(nb.cells):
            client.execute_cell(cell, i)
        last = [o for o in nb.cells[-1].outputs if o["output_type"] == "execute_result"]
        assert len(last) == 1, f"the last cell gave {nb.cells[-1].outputs}"
        data = last[0]["data"]
        assert WIDGET_MIME in data, f"the last cell displayed {sorted(data)}, not a widget"
        assert data["text/plain"].startswith("<LCAResult: 20 iterations")
        model_id = data[WIDGET_MIME]["model_id"]
        # ask the kernel which widget that is: the explorer of the result the cell returned
        probe = new_code_cell(
            "from ipywidgets.widgets.widget import _instances\n"
            f"w = _instances[{model_id!r}]\n"
            "print(type(w).__module__, type(w).__name__, w.result is _, w.result.n_iterations, len(w.figures))"
        )
        nb.cells.append(probe)
        client.execute_cell(probe, len(nb.cells) - 1)
    text = "".join(o.get("text", "") for o in probe.outputs)
    assert text.split() == ["lca_notebook.widgets.explorer", "Explorer", "True", "20", "7"], probe.outputs


LIVE_TRAIN = """
for step in range(6):
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    if step == 2:  # wait (on a condition) until the LCA has stored an iteration while this cell still trains
        trajectory.flush()
        while trajectory_live.counts()[1] < 1:
            time.sleep(0.01)
        seen_while_training = trajectory_live.counts()
"""


def test_lca_record_live_computes_the_lca_while_the_cell_trains(shell, tmp_path):
    shell.run_line_magic("load_ext", "lca_notebook")
    _setup_model(shell)
    import time

    shell.user_ns.update(torch=torch, time=time, data=(shell.user_ns["x"], shell.user_ns["y"]))
    path = tmp_path / "run.zarr"
    try:
        with pytest.raises(ValueError, match="--live needs --data"):
            shell.run_cell_magic("lca_record", f"model opt --to {path} --live", LIVE_TRAIN)
        with pytest.raises(ValueError, match=r"--refresh must be a number of seconds > 0, got -1"):
            shell.run_cell_magic("lca_record", f"model opt --to {path} --live --data data --refresh -1", LIVE_TRAIN)
        # the expression quoted, as the hint for a missing --data shows it
        shell.run_cell_magic("lca_record", f'model opt --to {path} --live --data "(x, y)" --refresh 0.05', LIVE_TRAIN)
        snapshots, stored = shell.user_ns["seen_while_training"]
        assert snapshots == 4 and 1 <= stored <= 3  # the LCA ran during training, behind it
        live = shell.user_ns["trajectory_live"]
        result = live.join(timeout=120)
        assert shell.user_ns["trajectory_lca"] is result and live.lag() == 0
        assert "LCA done: 6 iterations" in live.status.value
        assert live.explorer is not None and live.explorer.range.max == 6
        from lca_notebook.storage.trajectories import RecordedTrajectory

        traj = RecordedTrajectory(str(path))
        want = lca_notebook.analyze(shell.user_ns["model"], shell.user_ns["data"], [traj[k] for k in range(7)],
                                    progress=False)  # fmt: skip
        np.testing.assert_array_equal(result.lca.values, want.lca.values)
        np.testing.assert_array_equal(result.loss.values, want.loss.values)
        np.testing.assert_array_equal(result.residual.values, want.residual.values)
    finally:
        for name in ("data", "time", "seen_while_training", "trajectory_live", "trajectory_lca"):
            shell.user_ns.pop(name, None)
