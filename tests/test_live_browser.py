"""Watch it learn, in a real browser: the explorer's figures grow while training runs, with no click.

A trainer subprocess trains the digits MLP, recording to ``trajectory.zarr``; a follower subprocess runs
``analyze(..., store="lca.zarr", follow=True)`` on it; a notebook in JupyterLab (headless Debian Chromium,
driven by Playwright) shows ``lca.explore(store, follow=True)``. The trainer pauses after a few steps (a
file the test creates lets it go on) so the page is up before training goes on; then the test only
watches the DOM (the summary line, the slider's readout, the loss line's vertex count) and sees them grow,
and, once the trainer is told to finish, reach every iteration of the run. A screenshot is left in
artifacts/live.png. JupyterLab's settings live in a temporary folder.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from browser_utils import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, REPO, JupyterLab, kernel_env, write_lab_settings

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(900)]

STEPS = 150  # optimizer steps, so the finished run has STEPS iterations
PAUSE_AT = 5  # the trainer waits here for the "go" file
STEP_SECONDS = 0.15  # pace of training after "go": ~25 s, many explorer refreshes (interval 1 s)

# The trainer: full-batch SGD on the digits training split, one snapshot per step, flushed at once so the
# follower sees it. Waits on files the test creates ("go" after PAUSE_AT steps, "stop" before closing the
# recorder, so training is still running while the test watches); gives up after 15 minutes if orphaned.
TRAINER = textwrap.dedent(
    """
    import json, os, sys, time
    import torch
    import lca_notebook as lca
    from lca_notebook import models

    a = json.loads(sys.argv[1])
    torch.set_num_threads(1)

    def wait_for(name):
        deadline = time.monotonic() + 900
        while not os.path.exists(a[name]):
            if time.monotonic() > deadline:
                sys.exit(f"trainer: no {a[name]} after 900 s")
            time.sleep(0.05)

    model = models.mlp(seed=0)
    x, y = models.digits_data("train")
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    rec = lca.record(model, opt, path=a["trajectory"]).start()
    for step in range(1, a["steps"] + 1):
        if step == a["pause_at"] + 1:
            open(a["paused"], "w").close()
            wait_for("go")
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        rec.flush()
        if step > a["pause_at"]:
            time.sleep(a["step_seconds"])  # the pace of a slow training run
    wait_for("stop")
    rec.close()
    """
)

FOLLOWER = textwrap.dedent(
    """
    import json, sys
    import torch
    import lca_notebook as lca
    from lca_notebook import models

    a = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    result = lca.analyze(
        models.mlp(seed=0), models.digits_data("train"), a["trajectory"], store=a["store"], follow=True,
        progress=False, timeout=900,
    )
    print("followed", result.n_iterations)
    """
)

# The notebook's one cell: wait (on the store's own count) until the follower has stored an iteration,
# then show the explorer following the store.
CELL = """\
import time
import lca_notebook as lca
from lca_notebook.storage.files import read_attrs

store = {store!r}


def stored():
    try:
        return read_attrs(store).get("completed_iterations", 0)
    except (OSError, ValueError):
        return 0


deadline = time.monotonic() + 600
while stored() < 1:
    assert time.monotonic() < deadline, f"no iteration in {{store}} after 600 s"
    time.sleep(0.2)
explorer = lca.explore(store, follow=True, interval=1.0)
explorer"""


def _write_notebook(path: Path, store: Path):
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell(CELL.format(store=str(store)))]
    nbformat.write(nb, str(path))


def _start(script: str, name: str, args: dict, tmp_path: Path) -> subprocess.Popen:
    path = tmp_path / f"{name}.py"
    path.write_text(script)
    env = kernel_env()
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    with open(tmp_path / f"{name}.log", "w") as log:  # the child holds its own copy of the file
        return subprocess.Popen(
            [sys.executable, str(path), json.dumps(args)], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT
        )


def _stop(proc: subprocess.Popen | None):
    """Kill ``proc`` (by its own pid) if it still runs."""
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait(timeout=30)


def _log(tmp_path: Path, name: str) -> str:
    p = tmp_path / f"{name}.log"
    return p.read_text()[-3000:] if p.exists() else "(no log)"


def _wait_for(page, predicate, what, timeout=180.0, alive=()):
    """Poll ``predicate`` (the page's own clock between polls); fail naming ``what``, or a helper that died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        for name, proc, log in alive:
            assert proc.poll() is None, f"the {name} exited with {proc.returncode} while waiting for {what}:\n{log()}"
        page.wait_for_timeout(250)  # polling a condition, not a fixed sleep
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _shown(page):
    """(start, stop, n_iterations, readout, loss-line vertices, fractions-line vertices) as the page draws them, or
    None mid-render. The loss line has a vertex per checkpoint of the range, the fractions overview (helped) one per
    iteration of the whole run."""
    summary = page.locator(".lca-summary")
    if not summary.count():
        return None
    text = summary.first.inner_text()
    m = re.search(r"iterations \[(\d+), (\d+)\) of (\d+)", text)
    if not m:
        return None
    d = page.locator(".lca-figure-loss path.line").first.get_attribute("d") or ""
    f = page.locator(".lca-figure-fractions path.line").first.get_attribute("d") or ""
    readout = page.locator(".lca-explorer .widget-readout").first.inner_text()
    vertices = [len(re.findall(r"[ML]", path)) for path in (d, f)]
    return int(m.group(1)), int(m.group(2)), int(m.group(3)), readout, *vertices


@pytest.fixture
def lab(tmp_path, tmp_path_factory):
    """A JupyterLab server on ``tmp_path`` with settings (light theme, no news) in a temporary folder."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium)")
    pytest.importorskip("playwright.sync_api")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    settings = write_lab_settings(tmp_path_factory.mktemp("live-lab-settings"))
    saved = {k: os.environ.get(k) for k in ("JUPYTERLAB_SETTINGS_DIR", "JUPYTERLAB_WORKSPACES_DIR")}
    os.environ["JUPYTERLAB_SETTINGS_DIR"] = str(settings)
    os.environ["JUPYTERLAB_WORKSPACES_DIR"] = str(tmp_path_factory.mktemp("live-lab-workspaces"))
    try:
        server = JupyterLab(tmp_path, log=ARTIFACTS / "jupyterlab-live.log")
        server.__enter__()
    finally:
        for k, v in saved.items():  # the server has read them; nothing else in this process should
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        yield server
    finally:
        server.__exit__(None, None, None)


def test_figures_grow_with_no_click_while_training_runs(lab, tmp_path):
    from playwright.sync_api import sync_playwright

    store = tmp_path / "lca.zarr"
    files = {name: str(tmp_path / name) for name in ("paused", "go", "stop")}
    args = {
        "trajectory": str(tmp_path / "trajectory.zarr"),
        "store": str(store),
        "steps": STEPS,
        "pause_at": PAUSE_AT,
        "step_seconds": STEP_SECONDS,
        **files,
    }
    _write_notebook(tmp_path / "live.ipynb", store)
    trainer = follower = None
    try:
        trainer = _start(TRAINER, "trainer", args, tmp_path)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_context(viewport={"width": 1600, "height": 2000}).new_page()
            page.set_default_timeout(120_000)
            try:
                helpers = [("trainer", trainer, lambda: _log(tmp_path, "trainer"))]
                _wait_for(page, lambda: Path(files["paused"]).exists(), "the trainer's first steps", 300, helpers)
                follower = _start(FOLLOWER, "follower", args, tmp_path)
                helpers.append(("follower", follower, lambda: _log(tmp_path, "follower")))

                page.goto(f"{lab.url}/lab/tree/live.ipynb?token={lab.token}")
                page.locator(".jp-StatusBar-TextItem", has_text=re.compile(r"\| Idle")).first.wait_for(timeout=300_000)
                no_news = page.locator(".jp-toast-button, button", has_text=re.compile(r"^No$"))
                if no_news.count():
                    no_news.first.click()  # the "notified about Jupyter news?" toast would cover the panel
                page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
                page.locator('.lm-Menu-item[data-command="runmenu:run-all"]').click()
                page.wait_for_selector("div.bqplot.figure", state="attached", timeout=300_000)
                page.locator(".lca-explorer").first.scroll_into_view_if_needed()
                first = _wait_for(
                    page, lambda: (s := _shown(page)) and s[4] > 1 and s, "the explorer and its loss line", 300, helpers
                )
                assert first[2] <= PAUSE_AT, f"more iterations shown than recorded before 'go': {first}"

                # From here on: no click, no key press. Training goes on; the page must grow by itself.
                Path(files["go"]).touch()
                seen = [first]

                def grew_again():
                    now = _shown(page)
                    if now and now[2] != seen[-1][2]:
                        seen.append(now)
                    return len(seen) >= 3

                _wait_for(page, grew_again, "the explorer to grow twice with no click", 300, helpers)
                totals = [s[2] for s in seen]
                assert totals == sorted(totals) and len(set(totals)) == 3, f"iterations shown over time: {seen}"
                assert trainer.poll() is None, "training had ended: the growth was not seen while it ran"
                last = seen[-1]
                assert last[:2] == (0, last[2]), f"the range ending at the newest iteration did not follow it: {last}"
                page.locator(".lca-explorer").first.screenshot(path=str(ARTIFACTS / "live.png"))

                # The trainer finishes its run and closes the recorder; the follower completes the store, and the
                # explorer's last refresh shows every iteration: one loss vertex per checkpoint.
                Path(files["stop"]).touch()
                assert trainer.wait(timeout=300) == 0, _log(tmp_path, "trainer")
                assert follower.wait(timeout=600) == 0, _log(tmp_path, "follower")
                final = _wait_for(
                    page,
                    lambda: (s := _shown(page)) and s[2] == STEPS and s[4] == STEPS + 1 and s[5] == STEPS and s,
                    f"all {STEPS} iterations: {STEPS + 1} loss vertices and {STEPS} on the fractions overview",
                    300,
                )
                assert final[:2] == (0, STEPS)
                assert final[3] == f"0 – {STEPS}"
            finally:
                page.screenshot(path=str(ARTIFACTS / "live-last.png"))  # what the page showed at the end (or failure)
                browser.close()
    finally:
        Path(files["go"]).touch()
        Path(files["stop"]).touch()
        _stop(trainer)
        _stop(follower)
