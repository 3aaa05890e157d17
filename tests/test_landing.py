"""The first five minutes, in a real browser: `python -m lca_notebook --out DIR`, started from the checkout,
prints a URL; opened in headless Chromium with no click, it shows THAT run's explorer drawn and live; Export
writes into the run folder; the checkout is unchanged, ignored files included (no bytecode either, whatever
PYTHONDONTWRITEBYTECODE says). Leaves landing.png in browser_utils.ARTIFACTS (the README's picture: see "What
you will see" there for the command that refreshes docs/explorer.png).
"""

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
from browser_utils import (
    ARTIFACTS,
    CHROMIUM,
    CHROMIUM_ARGS,
    REPO,
    JupyterLab,
    start_main_job,
    stop_main_job,
    wait_for_url,
    wait_until,
)

pytestmark = [pytest.mark.browser, pytest.mark.timeout(900)]

STEPS = 40


def _checkout_state() -> str | None:
    """Every tracked change, untracked file and ignored path git sees in the checkout (None outside git)."""
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--ignored"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout


def test_the_url_shows_the_runs_explorer_drawn_and_live_with_no_click(tmp_path):
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    before = _checkout_state()
    run = tmp_path / "run"
    # a new user's environment: no PYTHONDONTWRITEBYTECODE (.ci/setup's venv writes no bytecode by itself)
    drop = ("DISPLAY", "JUPYTER_PATH", "CI", "PYTHONDONTWRITEBYTECODE")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["OMP_NUM_THREADS"] = "1"
    # JupyterLab's own defaults (light theme, no restored tabs), whatever another run left in ~/.jupyter/lab
    env["JUPYTERLAB_SETTINGS_DIR"] = str(tmp_path / "lab-settings")
    env["JUPYTERLAB_WORKSPACES_DIR"] = str(tmp_path / "lab-workspaces")
    proc, lines = start_main_job(["--steps", str(STEPS), "--out", str(run)], cwd=REPO, env=env)
    seen: list[str] = []
    try:
        url = wait_for_url(lines, seen)
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1600, "height": 1450})
            page.set_default_timeout(120_000)
            try:
                page.goto(url)
                # drawn with no click: the figures of the run's explorer appear by themselves
                page.wait_for_selector("div.bqplot.figure", state="attached", timeout=300_000)
                figures = page.locator(".lca-explorer div.bqplot.figure")
                wait_until(lambda: figures.count() >= 6, "the explorer's figures (six or more)")
                wait_until(lambda: page.locator(".lca-summary").count() > 0, "the explorer's summary")
                options = page.locator(".lca-explorer select").first.locator("option").all_inner_texts()
                assert {"fc1", "fc2", "fc3"} <= set(options), f"the run's layers are not offered: {options}"
                readout = page.locator(".widget-readout").first
                assert readout.inner_text() == f"0 – {STEPS}", "the range slider does not span this run"
                # the kernel JupyterLab attached still opened the notebook's stored kernelspec: nothing to save
                assert page.locator(".jp-Document.jp-mod-dirty, .lm-TabBar-tab.jp-mod-dirty").count() == 0

                wait_until(lambda: page.locator(".lca-explorer path.line").count() > 0, "the drawn curves")
                page.screenshot(path=str(ARTIFACTS / "landing.png"))  # what the URL shows first, untouched
                # the histogram's bins spread over its plot (bqplot's mark padding once squeezed them into a spike)
                hist = figures.filter(has_text="Distribution of LCA").first
                edges = hist.locator("rect.bar").evaluate_all(
                    "els => els.map(e => { const r = e.getBoundingClientRect(); return [r.left, r.right]; })"
                )
                spread = max(r for _, r in edges) - min(left for left, _ in edges)
                assert spread > 0.5 * hist.bounding_box()["width"], f"histogram bars span {spread:.0f} px"

                # live, not a picture: a key press on the slider reaches the kernel, which rewrites the summary
                summary = page.locator(".lca-summary").first
                first = summary.inner_text()
                page.locator(".noUi-handle-lower").first.focus()
                page.keyboard.press("ArrowRight")
                wait_until(lambda: readout.inner_text() == f"1 – {STEPS}", "the slider to read 1 – STEPS")
                wait_until(lambda: summary.inner_text() != first, "the kernel to update the summary")

                # Export's default name lands in the run folder (the kernel's working directory)
                page.locator(".lca-explorer button", has_text="Export").first.click()
                written = wait_until(lambda: [p.name for p in run.glob("*.csv")], "Export to write a .csv")
                assert len(written) == 1
                rows = (run / written[0]).read_text().splitlines()
                assert len(rows) == 1 + 17_226  # a header and one row per parameter of the MLP
            finally:
                page.screenshot(path=str(ARTIFACTS / "landing-last.png"))
                browser.close()
    finally:
        code = stop_main_job(proc, signal.SIGTERM)  # as CI or a process manager stops it (test_main: Ctrl-C)
    assert code == 0, "".join(seen)
    after = _checkout_state()
    if before is not None:
        appeared = sorted(set(after.splitlines()) - set(before.splitlines()))
        gone = sorted(set(before.splitlines()) - set(after.splitlines()))
        assert not appeared and not gone, f"the checkout changed: new {appeared}, gone {gone}"
    assert re.search(rf"{STEPS} iterations x 17,226 parameters", "".join(seen))

    # Later, with that kernel gone: a plain JupyterLab on the run folder still draws the explorer from the
    # widget state saved in the notebook (static until Run All), as --help promises.
    with JupyterLab(run, log=tmp_path / "reopen.log") as lab, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1450})
            page.goto(f"{lab.url}/lab/tree/explorer.ipynb?reset&token={lab.token}")
            page.wait_for_selector(".lca-explorer div.bqplot.figure", state="attached", timeout=300_000)
            wait_until(lambda: page.locator(".lca-explorer div.bqplot.figure").count() >= 6, "the saved figures")
            assert page.locator(".widget-readout").first.inner_text() == f"0 – {STEPS}"  # as the notebook was run
        finally:
            browser.close()
