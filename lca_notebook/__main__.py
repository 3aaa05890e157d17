"""Train a small MLP on scikit-learn's digits, compute its Loss Change Allocation (LCA) and open the
explorer on that run in JupyterLab.

The run goes in a folder of its own (default: ~/lca_runs/digits_mlp-<date>-<time>; choose it with --out):

  digits_mlp.nc    the result; lca_notebook.open(<absolute path>) reads it back anywhere
  explorer.ipynb   a notebook that opens that result by its absolute path and shows the explorer
  jupyterlab.log   JupyterLab's log

JupyterLab serves that folder. Before the URL is printed, the notebook is run in the kernel JupyterLab will
attach to it, so the URL shows the run's explorer already drawn and live (sliders, clicks, Export, whose
files land in the run folder). The notebook also keeps its outputs and widget state, so it opens drawn
later too. Ctrl-C (or SIGTERM) stops JupyterLab and its kernel; the run folder stays. Nothing is written
in the directory you start from.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import webbrowser
from pathlib import Path

import numpy as np
import torch

RESULT_NAME = "digits_mlp.nc"
NOTEBOOK_NAME = "explorer.ipynb"
LOG_NAME = "jupyterlab.log"
# The kernel the run notebook names, exactly as JupyterLab writes it once the kernel connects (a notebook
# whose stored kernelspec differs is marked changed and saved again).
KERNELSPEC = {"display_name": "Python 3 (ipykernel)", "language": "python", "name": "python3"}
EXAMPLES = """examples:
  python -m lca_notebook                         train, analyse, serve the explorer (Ctrl-C to stop)
  python -m lca_notebook --out /tmp/run1         the run folder is /tmp/run1
  python -m lca_notebook --no-lab --steps 100    save the run folder and stop (no JupyterLab)
"""


def summarize(result) -> str:
    """A short text summary of a result: losses, residuals, helping fraction, layers."""
    loss = result.loss.values
    res = np.abs(result.residual.values)
    helped = result.fractions().helped.values
    by_layer = result.total(by="layer")
    change = loss[-1] - loss[0]
    lines = [
        f"{result.n_iterations} iterations x {result.n_parameters:,} parameters, method={result.attrs.get('method')}",
        f"loss {loss[0]:.4f} -> {loss[-1]:.4f} (change {change:+.4f}); sum of all LCA "
        f"{float(result.total(by='total')[0]) + float(result.lca_rest.sum()):+.4f}",
        f"|residual| per iteration: median {np.median(res):.1e}, max {res.max():.1e}",
        f"parameters helping per iteration: mean {helped.mean():.1%} (the paper: barely over 50%)",
        "LCA per layer (negative = helped, lowered the loss):",
    ]
    for layer, value in zip(by_layer["layer"].values, by_layer.values, strict=False):
        share = value / change if change else float("nan")
        lines.append(
            f"  {layer:<12} {value:+.4f}  ({share:.0%} of the loss change){'  <- hurt overall' if value > 0 else ''}"
        )
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lca_notebook",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", metavar="DIR", default=None, help="the run folder (default: ~/lca_runs/digits_mlp-<time>)")
    p.add_argument("--steps", type=int, default=300, help="training steps to record and analyse (default: 300)")
    p.add_argument(
        "--no-lab", action="store_true", help="save the run folder and stop: no JupyterLab (its notebook is not run)"
    )
    p.add_argument(
        "--no-browser",
        action="store_true",
        help="print the URL but open no web browser (the default with no display, no terminal, or CI set)",
    )
    p.add_argument(
        "--port", type=int, default=None, help="JupyterLab's port on 127.0.0.1, 1-65535 (default: a free one)"
    )
    return p


def run_folder(out: str | None) -> Path:
    """The run folder, made (absolute); the default is under the home directory, never the current one."""
    if out is not None:
        folder = Path(out).expanduser().absolute()
    else:
        folder = Path.home() / "lca_runs" / time.strftime("digits_mlp-%Y%m%d-%H%M%S")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if out is not None:
            raise SystemExit(f"cannot make the run folder {folder}: {exc}; choose another with --out DIR") from None
        folder = Path(tempfile.mkdtemp(prefix="lca_run_"))
        print(f"cannot write under {Path.home()} ({exc}); the run goes in {folder}")
    return folder


def train_and_analyze(steps: int):
    """The demo: an MLP on digits, recorded at every step, then its LCA over all 1,797 digits."""
    import lca_notebook as lca
    from lca_notebook import models

    torch.manual_seed(0)
    x, y = models.digits_data()
    model = models.mlp(seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"training an MLP ({n_params:,} parameters) on digits for {steps} steps, recording ...", flush=True)
    with lca.record(model, opt) as trajectory:
        for _ in range(steps):
            idx = torch.randint(0, len(x), (64,), generator=g)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    print(f"computing LCA over all {len(x)} samples ...", flush=True)
    return lca.analyze(model, (x, y), trajectory, progress=sys.stderr.isatty())


def run_notebook(result_path: Path, summary: str):
    """The run folder's notebook (an nbformat node): it opens ``result_path`` by absolute path."""
    import nbformat.v4 as v4

    folder = result_path.parent
    intro = (
        f"# LCA of a digits MLP, run of {time.strftime('%Y-%m-%d %H:%M')}\n\n"
        "LCA splits each iteration's change of the training loss among the parameters: **negative LCA helped** "
        "(lowered the loss, drawn green), positive hurt. Drag the iteration slider, choose a layer (or click its "
        f"bar), sum by neuron or layer. Export writes into this run folder, `{folder}`.\n\n"
        "Sliders do nothing (e.g. after JupyterLab was restarted)? Run > Run All Cells."
    )
    code = f"%load_ext lca_notebook\nresult = lca.open({str(result_path)!r})\nexplorer = lca.explore(result)\nexplorer"
    more = (
        "## What `python -m lca_notebook` printed\n\n```\n" + summary + "\n```\n\n"
        "`result` is an `LCAResult` (an `xarray.Dataset` inside): sums over any iteration range and group, "
        "e.g. per layer over the whole run (negative = helped):"
    )
    nb = v4.new_notebook(
        cells=[
            v4.new_markdown_cell(intro),
            v4.new_code_cell(code),
            v4.new_markdown_cell(more),
            v4.new_code_cell('result.total(by="layer").to_series()'),
        ],
        metadata={"kernelspec": dict(KERNELSPEC), "lca_notebook": {"run_folder": str(folder)}},
    )
    return nb


#: The first line of the JupyterLab log this job writes: a file of that name without it is not replaced.
LOG_HEADER = "# lca_notebook: JupyterLab's log for this run folder\n"


def _foreign(folder: Path, lab: bool = True) -> str | None:
    """Why the run folder may not be written: a file this job writes is there and is not one it wrote (the
    notebook, the result, with ``lab`` JupyterLab's log), checked before training."""
    from lca_notebook.result import saved_kind

    names = [(NOTEBOOK_NAME, "a notebook"), (RESULT_NAME, "an LCA result")] + ([(LOG_NAME, "a log")] if lab else [])
    for name, what in names:
        path = folder / name
        if not path.exists():
            continue
        try:
            if name == NOTEBOOK_NAME:
                ours = "lca_notebook" in json.loads(path.read_text(encoding="utf-8")).get("metadata", {})
            elif name == RESULT_NAME:
                ours = saved_kind(str(path)) == "result"
            else:
                with open(path, encoding="utf-8", errors="replace") as f:
                    ours = f.readline() == LOG_HEADER
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            return (
                f"{path} is there already and is not {what} this job wrote: it is left as it is. "
                "Choose another folder with --out DIR (or leave --out out for a new folder under ~/lca_runs)."
            )
    return None


def _port_problem(port: int | None) -> str | None:
    """Why ``--port`` cannot serve JupyterLab (checked before training), or None."""
    if port is None:
        return None
    if not 1 <= port <= 65535:
        return f"--port must be a port number from 1 to 65535, got {port}; leave it out for a free one"
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            return f"port {port} on 127.0.0.1 is not free ({exc.strerror}): choose another with --port, or leave it out"
    return None


def write_notebook(nb, path: Path, *, trusted: bool) -> None:
    """Write ``nb``; ``trusted`` signs it (as `jupyter trust` does) so JupyterLab renders its widget outputs."""
    import nbformat

    nbformat.validate(nb)
    if trusted:
        from nbformat.sign import NotebookNotary

        NotebookNotary().sign(nb)
    tmp = path.with_name(path.name + ".tmp")
    nbformat.write(nb, tmp)
    os.replace(tmp, path)  # a reader never sees half a notebook


# -- JupyterLab -------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_dirs() -> str:
    """A folder for this server only, put first on its Jupyter paths: ``kernels/python3`` runs THIS interpreter
    (a python3 kernel installed for another one could not import lca_notebook), and ``labconfig`` turns off
    the "Jupyter news?" prompt that would cover the explorer. The user's own JupyterLab is left as it is."""
    folder = tempfile.mkdtemp(prefix="lca_lab_")
    spec = Path(folder) / "kernels" / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": KERNELSPEC["display_name"], "language": "python"})
    )
    (Path(folder) / "labconfig").mkdir()
    (Path(folder) / "labconfig" / "page_config.json").write_text(
        json.dumps({"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}})
    )
    return folder


class Lab:
    """JupyterLab serving ``root`` on 127.0.0.1, its log in ``root/jupyterlab.log``; ``stop()`` ends it and its
    kernels."""

    def __init__(self, root: Path, port: int | None = None):
        self.root = root
        self.port = port if port is not None else _free_port()
        self.token = secrets.token_hex(16)
        self.proc: subprocess.Popen | None = None
        self._dirs = ""

    def api(self, method: str, path: str, body: dict | None = None, timeout: float = 30):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/api/{path}",
            data=data,
            method=method,
            headers={"Authorization": f"token {self.token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            text = resp.read()
        return json.loads(text) if text else None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return (self.root / LOG_NAME).read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def start(self, timeout: float = 180) -> None:
        self._dirs = _server_dirs()
        env = dict(os.environ)
        for var in ("JUPYTER_PATH", "JUPYTER_CONFIG_PATH"):
            env[var] = os.pathsep.join(p for p in (self._dirs, env.get(var)) if p)
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        cmd = [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--ip=127.0.0.1",
            f"--port={self.port}",
            "--ServerApp.port_retries=0",
            f"--ServerApp.root_dir={self.root}",
            f"--IdentityProvider.token={self.token}",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd.append("--allow-root")
        with open(self.root / LOG_NAME, "w") as log:
            log.write(LOG_HEADER)
            log.flush()
            # stdin closed: JupyterLab then stops on the first Ctrl-C instead of asking on the terminal
            self.proc = subprocess.Popen(
                cmd, cwd=self.root, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"JupyterLab exited with code {self.proc.returncode}; the end of {self.root / LOG_NAME}:\n"
                    f"{self.log_tail()}\n(is port {self.port} taken? choose another with --port)"
                )
            try:
                self.api("GET", "status", timeout=2)
                return
            except (OSError, urllib.error.URLError):
                time.sleep(0.25)  # polling the server's status, not a fixed wait
        raise TimeoutError(f"JupyterLab did not answer within {timeout:.0f} s; see {self.root / LOG_NAME}")

    def notebook_kernel(self, name: str, timeout: float = 120) -> Path:
        """Start the session (and kernel) JupyterLab will attach to notebook ``name``; its connection file."""
        from jupyter_core.paths import jupyter_runtime_dir

        session = self.api(
            "POST", "sessions", {"path": name, "name": name, "type": "notebook", "kernel": {"name": "python3"}}
        )
        connection = Path(jupyter_runtime_dir()) / f"kernel-{session['kernel']['id']}.json"
        deadline = time.monotonic() + timeout
        while not connection.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the kernel's connection file {connection} did not appear; see {LOG_NAME}")
            time.sleep(0.1)
        return connection

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(OSError, urllib.error.URLError, ValueError):
                for session in self.api("GET", "sessions", timeout=5) or []:
                    self.api("DELETE", f"sessions/{session['id']}", timeout=20)  # shuts its kernel down
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._dirs:
            shutil.rmtree(self._dirs, ignore_errors=True)


def execute_in(nb, connection_file: Path, timeout: float = 600) -> str:
    """Run ``nb``'s cells in the (already running) kernel of ``connection_file``, keeping outputs and widget
    state: JupyterLab then shows the live widgets of that kernel, or the saved state once it is gone.
    Returns "" or, when a cell raised, the error (the cells after it are not run)."""
    import asyncio

    from jupyter_client.asynchronous import AsyncKernelClient
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    async def run():
        kc = AsyncKernelClient(connection_file=str(connection_file))
        kc.load_connection_file()
        kc.start_channels()
        try:
            await kc.wait_for_ready(timeout=timeout)
            client = NotebookClient(nb, timeout=timeout, allow_errors=False, store_widget_state=True)
            client.kc = kc
            reply = await kc.kernel_info(reply=True, timeout=timeout)
            nb.metadata["language_info"] = reply["content"]["language_info"]
            try:
                for index, cell in enumerate(nb.cells):
                    await client.async_execute_cell(cell, index, execution_count=client.code_cells_executed + 1)
            except CellExecutionError as exc:  # the traceback stays in the cell's outputs: serve it as it is
                return f"{exc.ename}: {exc.evalue}"
            finally:
                client.set_widgets_metadata()
            return ""
        finally:
            kc.stop_channels()

    return asyncio.run(run())


def _wants_browser(no_browser: bool) -> bool:
    if no_browser or os.environ.get("CI"):
        return False
    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return False
    return sys.stdout.isatty()


def serve(folder: Path, nb, *, port: int | None, open_browser: bool) -> int:
    """Start JupyterLab on ``folder``, run ``nb`` in the kernel it will attach, print the URL, serve until
    Ctrl-C / SIGTERM."""
    lab = Lab(folder, port)

    def stop_on_sigterm(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop_on_sigterm)
    print("starting JupyterLab and running the notebook in its kernel ...", flush=True)
    try:
        lab.start()
        failed = execute_in(nb, lab.notebook_kernel(NOTEBOOK_NAME))
        write_notebook(nb, folder / NOTEBOOK_NAME, trusted=True)
        if failed:
            print(f"the notebook stopped at an error (its traceback is in the notebook):\n{failed}", flush=True)
        url = f"http://127.0.0.1:{lab.port}/lab/tree/{NOTEBOOK_NAME}?token={lab.token}"
        print(f"\nthe explorer: open {url}", flush=True)
        print("(JupyterLab serves the run folder until Ctrl-C)", flush=True)
        if open_browser:
            webbrowser.open(url)
        assert lab.proc is not None
        code = lab.proc.wait()
        print(f"JupyterLab stopped (exit code {code}); see {folder / LOG_NAME}")
        return code
    except KeyboardInterrupt:
        print("\nstopping JupyterLab ...", flush=True)
        return 0
    finally:
        lab.stop()
        signal.signal(signal.SIGTERM, previous)
        print(_reopen_hint(folder), flush=True)


def _reopen_hint(folder: Path) -> str:
    python = shlex.quote(sys.executable)
    return (
        f"the run is in {folder}; to open it again:\n"
        f"  cd {shlex.quote(str(folder))} && {python} -m jupyterlab {NOTEBOOK_NAME}"
        f"      (in Python: lca_notebook.open({str(folder / RESULT_NAME)!r}))"
    )


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    needs = ["sklearn"] if args.no_lab else ["sklearn", "jupyterlab", "nbclient", "nbformat", "ipykernel"]
    missing = [m for m in needs if importlib.util.find_spec(m) is None]
    if missing:
        print(
            f"python -m lca_notebook needs {', '.join(missing)}, not installed here: "
            "pip install 'lca_notebook[demo]' (or `bash .ci/setup` in a checkout)",
            file=sys.stderr,
        )
        return 2
    if args.steps < 1:
        print(f"--steps must be at least 1, got {args.steps}", file=sys.stderr)
        return 2
    problem = None if args.no_lab else _port_problem(args.port)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    folder = run_folder(args.out)
    foreign = _foreign(folder, lab=not args.no_lab)
    if foreign:
        print(foreign, file=sys.stderr)
        return 2
    result = train_and_analyze(args.steps)
    # A rerun into the same --out replaces its own earlier result (save still refuses anything that is not one).
    result_path = Path(result.save(folder / RESULT_NAME, overwrite=True))
    summary = summarize(result)
    print(summary)
    print(f"\nsaved: {result_path}  (in Python: lca_notebook.open({str(result_path)!r}))")
    if importlib.util.find_spec("nbformat") is None:
        return 0
    nb = run_notebook(result_path, summary)
    write_notebook(nb, folder / NOTEBOOK_NAME, trusted=False)
    print(f"notebook: {folder / NOTEBOOK_NAME}")
    if args.no_lab:
        print(_reopen_hint(folder) + "\n  then run all cells (Run > Run All Cells) to draw the explorer")
        return 0
    return serve(folder, nb, port=args.port, open_browser=_wants_browser(args.no_browser))


if __name__ == "__main__":
    sys.exit(main())
