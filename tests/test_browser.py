"""The explorer in a real browser: JupyterLab in headless Debian Chromium, driven by Playwright.

Opens the quickstart notebook, runs all cells from the Run menu, waits for the bqplot figures, moves
the iteration slider with the keyboard and with the mouse, and checks through the DOM that what is
plotted followed (the summary line, the slider's readout, the loss line's SVG path and its vertex
count, one per plotted checkpoint). It
also exports the figures (rendered by the browser, written by the kernel) and leaves a screenshot in
artifacts/explorer.png.
"""

import re
import shutil
import time
from pathlib import Path

import pytest
from browser_utils import CHROMIUM, CHROMIUM_ARGS, REPO, JupyterLab, copy_notebook

pytestmark = [pytest.mark.browser, pytest.mark.timeout(600)]

ARTIFACTS = REPO / "artifacts"
SUMMARY = re.compile(r"iterations \[(\d+), (\d+)\)")


@pytest.fixture(scope="module")
def lab_page(tmp_path_factory):
    """(JupyterLab server, Playwright page) with the quickstart notebook in the server's root."""
    if not Path(CHROMIUM).exists():
        pytest.skip(
            f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium) to run the browser test"
        )
    sync_api = pytest.importorskip("playwright.sync_api")
    root = tmp_path_factory.mktemp("lab")
    copy_notebook("01_quickstart.ipynb", root)
    ARTIFACTS.mkdir(exist_ok=True)
    with JupyterLab(root, log=ARTIFACTS / "jupyterlab.log") as lab, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        context = browser.new_context(viewport={"width": 1500, "height": 1900}, accept_downloads=True)
        page = context.new_page()
        page.set_default_timeout(60_000)
        try:
            yield lab, page
        finally:
            page.screenshot(path=str(ARTIFACTS / "browser-last.png"))  # what the page showed at the end (or failure)
            context.close()
            browser.close()


def _summary(page):
    text = page.locator(".lca-summary").first.inner_text()
    m = SUMMARY.search(text)
    assert m, f"no range in the summary {text!r}"
    return int(m.group(1)), int(m.group(2))


def _loss_path(page):
    return page.locator(".lca-figure-loss path.line").first.get_attribute("d")


def _readout(page):
    return page.locator(".widget-readout").first.inner_text()


def _wait_for(page, predicate, what, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        page.wait_for_timeout(200)  # polling a condition, not a fixed sleep
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _loss_points(page) -> int:
    """Vertices of the true-loss line as drawn (one per plotted checkpoint)."""
    d = _loss_path(page) or ""
    return len(re.findall(r"[ML]", d))


def _open_and_run_all(lab, page):
    page.goto(f"{lab.url}/lab/tree/01_quickstart.ipynb?token={lab.token}")
    # the notebook is loaded and its kernel ready: all cells shown, status bar says Idle
    page.locator(".jp-StatusBar-TextItem", has_text=re.compile(r"\| Idle")).first.wait_for(timeout=180_000)
    no_news = page.locator(".jp-toast-button, button", has_text=re.compile(r"^No$"))
    if no_news.count():
        no_news.first.click()  # the "notified about Jupyter news?" toast would cover the panel
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
    page.locator('.lm-Menu-item[data-command="runmenu:run-all"]').click()
    # JupyterLab renders off-screen outputs lazily: wait for attachment, then scroll into view
    page.wait_for_selector("div.bqplot.figure", state="attached", timeout=300_000)
    page.locator(".lca-explorer").first.scroll_into_view_if_needed()
    _wait_for(
        page,
        lambda: page.locator("div.bqplot.figure").count() == 6 and _loss_points(page) > 1,
        "six figures and a drawn loss line",
    )


def test_run_all_then_move_the_iteration_slider(lab_page):
    lab, page = lab_page
    _open_and_run_all(lab, page)
    assert _summary(page) == (0, 150)
    assert _readout(page) == "0 – 150"
    assert _loss_points(page) == 151  # one vertex per checkpoint: 151 < the figure's ~440 points
    before = _loss_path(page)

    # keyboard: focus the lower handle, ArrowRight moves the start by one iteration
    page.locator(".noUi-handle-lower").first.focus()
    page.keyboard.press("ArrowRight")
    _wait_for(page, lambda: _summary(page) == (1, 150), "the summary to say iterations [1, 150)")
    assert _readout(page) == "1 – 150"
    _wait_for(page, lambda: _loss_points(page) == 150, "the loss line to start at checkpoint 1")
    assert _loss_path(page) != before
    for _ in range(9):
        page.keyboard.press("ArrowRight")
    _wait_for(page, lambda: _summary(page) == (10, 150), "iterations [10, 150) after ten presses")
    _wait_for(page, lambda: _loss_points(page) == 141, "141 checkpoints drawn")

    # mouse: drag the upper handle to about the middle of the track
    track = page.locator(".noUi-target").first.bounding_box()
    handle = page.locator(".noUi-handle-upper").first.bounding_box()
    page.mouse.move(handle["x"] + handle["width"] / 2, handle["y"] + handle["height"] / 2)
    page.mouse.down()
    page.mouse.move(track["x"] + track["width"] * 0.5, handle["y"] + handle["height"] / 2, steps=12)
    page.mouse.up()
    _wait_for(page, lambda: 50 < _summary(page)[1] < 100, "the range to end near the middle after the drag", timeout=60)
    start, stop = _wait_for(page, lambda: _stable_summary(page), "the explorer to settle after the drag")
    assert start == 10
    assert _readout(page) == f"{start} – {stop}"
    _wait_for(
        page, lambda: _loss_points(page) == stop - start + 1, f"{stop - start + 1} checkpoints drawn after the drag"
    )
    page.locator(".lca-explorer").first.screenshot(path=str(ARTIFACTS / "explorer.png"))


def _stable_summary(page):
    first = _summary(page)
    page.wait_for_timeout(500)  # the same range twice, half a second apart: no update in flight
    return first if _summary(page) == first else None


def test_export_figures_from_the_browser(lab_page):
    lab, page = lab_page
    if not page.locator(".lca-explorer").count():
        _open_and_run_all(lab, page)
    root = Path(lab.root)
    for ext, magic in ((".svg", b"<svg"), (".png", b"\x89PNG")):
        field = page.locator(".lca-explorer .widget-text input").first
        field.fill(f"figures{ext}")
        field.press("Enter")
        page.locator(".lca-explorer button", has_text="Export").first.click()
        names = [f"figures_{n}{ext}" for n in ("loss", "fractions", "cumulative", "layers", "heatmap", "histogram")]
        _wait_for(
            page,
            lambda names=names: all((root / n).exists() and (root / n).stat().st_size > 0 for n in names),
            f"the six {ext} files in {root}",
        )
        for n in names:
            assert (root / n).read_bytes().lstrip()[:8].startswith(magic) or magic in (root / n).read_bytes()[:200], n
        shutil.copy(root / names[0], ARTIFACTS / names[0])
    status = page.locator(".lca-export-status").first.inner_text()
    assert "wrote" in status


def test_hover_a_bar_for_its_value_then_click_it_to_choose_the_layer(lab_page):
    lab, page = lab_page
    if not page.locator(".lca-explorer").count():
        _open_and_run_all(lab, page)
    start, stop = _summary(page)
    bar = page.locator(".lca-figure-layers rect.bar").nth(1)  # the helped mark's bar of the second layer
    bar.scroll_into_view_if_needed()
    bar.hover()
    # bqplot puts tooltips in a layer of its own, shown (opacity > 0) while the pointer is on the mark
    tooltips = page.locator(".bqplot_mark_tooltip", has_text="LCA helped")
    text = _wait_for(
        page,
        lambda: next((t for t in tooltips.all_inner_texts() if "fc2" in t), None),
        "a tooltip naming fc2 and its LCA",
    )
    value = float(re.search(r"(-?\d+(\.\d+)?(e-?\d+)?)", text.split("fc2", 1)[1]).group(1))
    assert value < 0  # the helped bar: summed negative LCA
    bar.click()
    _wait_for(
        page,
        lambda: "fc2, by parameter" in page.locator(".lca-summary").first.inner_text(),
        "the summary to name fc2 after the click",
    )
    assert page.locator(".lca-explorer select").first.input_value() == "fc2"
    assert page.locator(".lca-figure-heatmap .mainheading").first.text_content().startswith("fc2:")
    assert _summary(page) == (start, stop)  # choosing a layer keeps the range
    # the tooltip's exact number is the sum over fc2's parameters that helped: show only those
    page.locator(".lca-explorer .widget-toggle-button", has_text=re.compile(r"^helped$")).first.click()
    summary = _wait_for(
        page,
        lambda: (t := page.locator(".lca-summary").first.inner_text()) and "fc2, by parameter, helped" in t and t,
        "the summary of fc2's helping parameters",
    )
    assert float(re.search(r"sum ([-+]?\d+\.\d+(e-?\d+)?)\s*$", summary).group(1)) == pytest.approx(value, rel=1e-5)
