"""The README's main job, `python -m lca_notebook`, run as a new user runs it: the venv's python called
directly (its bin/ not on PATH), training, LCA, summary, then JupyterLab serving the quickstart."""

import os
import queue
import signal
import subprocess
import sys
import threading
import urllib.request

import pytest


@pytest.mark.timeout(600)
def test_the_main_job_prints_a_summary_and_serves_the_explorer(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "JUPYTER_PATH")}
    env["PATH"] = "/usr/bin:/bin"  # as after `bash .ci/setup` with the venv not activated
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lca_notebook", "--steps", "30", "--out", str(tmp_path)],
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
    seen, url = [], None
    try:
        while url is None:
            line = lines.get(timeout=300)  # the condition we wait on: the URL line (or the end of output)
            assert line is not None, "the job ended without serving the explorer:\n" + "".join(seen)
            seen.append(line)
            if line.startswith("the explorer: open "):
                url = line.split("open ", 1)[1].strip()
        text = "".join(seen)
        assert "30 iterations x 17,226 parameters" in text and "LCA per layer" in text
        assert (tmp_path / "digits_mlp.nc").exists()
        with urllib.request.urlopen(url, timeout=60) as response:
            assert response.status == 200
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C, as a user stops it
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
