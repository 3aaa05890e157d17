"""Helpers shared by the notebook-front tests: a kernel of this interpreter, a JupyterLab server.

Not a conftest: imported explicitly by tests/test_magics.py and tests/test_browser.py.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "example_notebooks"
CHROMIUM = "/usr/bin/chromium"
#: Where the browser tests leave their screenshots and JupyterLab's logs (and .ci/run the documentation site):
#: outside the checkout, which no test writes into. LCA_ARTIFACTS chooses another folder.
ARTIFACTS = Path(os.environ.get("LCA_ARTIFACTS") or Path(tempfile.gettempdir()) / "lca_notebook-artifacts")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def python3_kernel() -> str:
    """The name of a kernel that runs this interpreter (so it imports this checkout), installed if needed."""
    from jupyter_client.kernelspec import KernelSpecManager

    ksm = KernelSpecManager()
    needs_install = "python3" not in ksm.find_kernel_specs()
    if not needs_install:
        argv0 = ksm.get_kernel_spec("python3").argv[0]
        needs_install = argv0 not in ("python", "python3", "{python}") and os.path.realpath(argv0) != os.path.realpath(
            sys.executable
        )
    if needs_install:
        subprocess.run(
            [sys.executable, "-m", "ipykernel", "install", "--sys-prefix", "--name", "python3"],
            check=True,
            capture_output=True,
        )
    return "python3"


def kernel_env() -> dict:
    """Environment for kernels and servers: this venv first on PATH, one torch thread (2 shared cores)."""
    env = dict(os.environ)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class JupyterLab:
    """A JupyterLab server on a free port serving ``root``, stopped (by its own pid) on exit."""

    def __init__(self, root: Path, token: str = "lca-test-token", log: Path | None = None):
        self.root, self.token, self.port = Path(root), token, free_port()
        self.log_path = log or self.root / "jupyterlab.log"
        self.proc = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> JupyterLab:
        python3_kernel()
        self._log = open(self.log_path, "w")
        cmd = [
            sys.executable,
            "-m",
            "jupyterlab",
            "--allow-root",
            "--no-browser",
            f"--port={self.port}",
            "--ip=127.0.0.1",
            f"--ServerApp.token={self.token}",
            f"--ServerApp.root_dir={self.root}",
            "--ServerApp.open_browser=False",
            "--LabApp.news_url=",
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        ]
        self.proc = subprocess.Popen(cmd, cwd=self.root, stdout=self._log, stderr=subprocess.STDOUT, env=kernel_env())
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"JupyterLab exited with {self.proc.returncode}; its log:\n{self.log_path.read_text()[-3000:]}"
                )
            try:
                with urllib.request.urlopen(f"{self.url}/api/status?token={self.token}", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.__exit__(None, None, None)
        raise TimeoutError(f"JupyterLab did not answer on {self.url} within 120 s; log: {self.log_path}")

    def shutdown_kernels(self):
        """Stop the server's kernels through its API (they are its children; it shuts them down)."""
        import json

        try:
            with urllib.request.urlopen(f"{self.url}/api/kernels?token={self.token}", timeout=5) as resp:
                kernels = json.load(resp)
            for k in kernels:
                req = urllib.request.Request(f"{self.url}/api/kernels/{k['id']}?token={self.token}", method="DELETE")
                urllib.request.urlopen(req, timeout=10).close()
        except OSError:
            pass

    def __exit__(self, *exc):
        if self.proc is not None and self.proc.poll() is None:
            self.shutdown_kernels()
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if getattr(self, "_log", None):
            self._log.close()


def write_lab_settings(folder: Path, theme: str | None = "JupyterLab Light") -> Path:
    """JupyterLab user settings in ``folder`` (for ``JUPYTERLAB_SETTINGS_DIR``): the theme, and no news or update
    checks (nothing is reached over the network, no notification covers the page). Returns ``folder``."""
    apputils = folder / "@jupyterlab" / "apputils-extension"
    apputils.mkdir(parents=True, exist_ok=True)
    if theme is not None:
        (apputils / "themes.jupyterlab-settings").write_text(f'{{"theme": "{theme}"}}')
    (apputils / "notification.jupyterlab-settings").write_text('{"fetchNews": "false", "checkForUpdates": false}')
    return folder


def copy_notebook(name: str, dest: Path) -> Path:
    target = Path(dest) / name
    shutil.copy(NOTEBOOKS / name, target)
    return target


def wait_until(predicate, what: str, timeout: float = 120, interval: float = 0.2):
    """Poll ``predicate`` until it returns something truthy (returned); fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)  # polling a condition, not a fixed wait
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def start_main_job(args, cwd, env):
    """`python -m lca_notebook ARGS` in its own process group; (process, queue of its output lines, None at end)."""
    import queue
    import threading

    proc = subprocess.Popen(
        [sys.executable, "-m", "lca_notebook", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    lines: queue.Queue = queue.Queue()

    def read():
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)  # end of output: the job stopped

    threading.Thread(target=read, daemon=True).start()
    return proc, lines


def wait_for_url(lines, seen: list, timeout: float = 400) -> str:
    """The URL the main job prints once JupyterLab serves its run (every line read is appended to ``seen``)."""
    while True:
        line = lines.get(timeout=timeout)  # the condition waited on: the URL line, or the end of output
        assert line is not None, "the job ended without serving the explorer:\n" + "".join(seen)
        seen.append(line)
        if line.startswith("the explorer: open "):
            return line.split("open ", 1)[1].strip()


def stop_main_job(proc, sig=None) -> int:
    """Ctrl-C to the job's process group, as a user stops it; its exit code (killed after 90 s)."""
    import signal

    os.killpg(proc.pid, sig or signal.SIGINT)
    try:
        return proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
