"""The explorer in a real browser: JupyterLab in headless Debian Chromium, driven by Playwright.

Opens the quickstart notebook, runs all cells from the Run menu, waits for the bqplot figures, moves
the iteration slider with the keyboard and with the mouse, and checks through the DOM that what is
plotted followed (the summary line, the slider's readout, the loss line's SVG path and its vertex
count, one per plotted checkpoint). It also exports the figures (rendered by the browser, written by
the kernel), drags on the fractions chart to choose the range (and checks the slider and the band
follow each other), switches JupyterLab to its dark theme and checks the lines and text still stand out
from the background, and leaves screenshots in artifacts/ (explorer.png, explorer_light.png,
explorer_dark.png). JupyterLab's settings live in a temporary folder: the theme starts light and the
user's own settings are neither read nor changed.
"""

import os
import re
import shutil
import time
from pathlib import Path

import pytest
from browser_utils import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, JupyterLab, copy_notebook, write_lab_settings

pytestmark = [pytest.mark.browser, pytest.mark.timeout(600)]

SUMMARY = re.compile(r"iterations \[(\d+), (\d+)\)")
FIGURES = ("loss", "residual", "fractions", "cumulative", "layers", "heatmap", "histogram")


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
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    settings = write_lab_settings(tmp_path_factory.mktemp("lab-settings"))
    saved = {k: os.environ.get(k) for k in ("JUPYTERLAB_SETTINGS_DIR", "JUPYTERLAB_WORKSPACES_DIR")}
    os.environ["JUPYTERLAB_SETTINGS_DIR"] = str(settings)
    os.environ["JUPYTERLAB_WORKSPACES_DIR"] = str(tmp_path_factory.mktemp("lab-workspaces"))
    with JupyterLab(root, log=ARTIFACTS / "jupyterlab.log") as lab, sync_api.sync_playwright() as pw:
        for k, v in saved.items():  # the server has read them; nothing else in this process should
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        context = browser.new_context(viewport={"width": 1600, "height": 2000}, accept_downloads=True)
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
        lambda: page.locator("div.bqplot.figure").count() == len(FIGURES) and _loss_points(page) > 1,
        f"{len(FIGURES)} figures and a drawn loss line",
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
        names = [f"figures_{n}{ext}" for n in FIGURES]
        _wait_for(
            page,
            lambda names=names: all((root / n).exists() and (root / n).stat().st_size > 0 for n in names),
            f"the {len(names)} {ext} files in {root}",
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
    # bqplot puts tooltips in a layer of its own; the kernel fills this one (an HTML widget) on hover
    tooltips = page.locator(".bqplot_mark_tooltip", has_text="helped (sum < 0)")
    text = _wait_for(
        page,
        lambda: next((t for t in tooltips.all_inner_texts() if "fc2" in t), None),
        "a tooltip naming fc2 and its LCA",
    )
    value = float(re.search(r"helped \(sum < 0\)\s*([-+]?\d+(\.\d+)?(e-?\d+)?)", text).group(1))
    assert "share of the loss change" in text
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


def _reset_controls(page):
    """All layers, both signs: the state the screenshots and the brush test start from."""
    page.locator(".lca-explorer select").first.select_option("(all layers)")
    page.locator(".lca-explorer .widget-toggle-button", has_text=re.compile(r"^both$")).first.click()
    _wait_for(
        page, lambda: "all layers, by parameter, both" in page.locator(".lca-summary").first.inner_text(), "reset"
    )


def _run_length(page) -> int:
    return int(re.search(r"of (\d+)", page.locator(".lca-summary").first.inner_text()).group(1))


def test_drag_on_the_fractions_chart_chooses_the_range_and_follows_the_slider(lab_page):
    lab, page = lab_page
    if not page.locator(".lca-explorer").count():
        _open_and_run_all(lab, page)
    _reset_controls(page)
    t = _run_length(page)
    # the whole run first (Home / End on the slider's handles): no band yet, so the drag draws a new one
    page.locator(".noUi-handle-lower").first.focus()
    page.keyboard.press("Home")
    page.locator(".noUi-handle-upper").first.focus()
    page.keyboard.press("End")
    _wait_for(page, lambda: _summary(page) == (0, t), f"iterations [0, {t})")
    overlay = page.locator(".lca-figure-fractions rect.overlay").first  # d3-brush's drag surface = the plot area
    overlay.scroll_into_view_if_needed()
    box = overlay.bounding_box()
    y = box["y"] + box["height"] / 2
    page.mouse.move(box["x"] + 0.2 * box["width"], y)
    page.mouse.down()
    page.mouse.move(box["x"] + 0.6 * box["width"], y, steps=10)
    page.mouse.up()
    start, stop = _wait_for(
        page,
        lambda: (r := _stable_summary(page)) and abs(r[0] - 0.2 * t) <= 2 and abs(r[1] - 0.6 * t) <= 2 and r,
        f"the range to become about [{0.2 * t:.0f}, {0.6 * t:.0f}) after the drag",
    )
    assert _readout(page) == f"{start} – {stop}"
    _wait_for(page, lambda: _loss_points(page) == stop - start + 1, "the loss panel to show the dragged range")

    # the slider moves the band: three key presses on the upper handle
    page.locator(".noUi-handle-upper").first.focus()
    for _ in range(3):
        page.keyboard.press("ArrowLeft")
    _wait_for(page, lambda: _summary(page) == (start, stop - 3), f"iterations [{start}, {stop - 3})")

    def band_matches():
        band = page.locator(".lca-figure-fractions rect.selection").first.bounding_box()
        want_left = box["x"] + start / t * box["width"]
        want_right = box["x"] + (stop - 3) / t * box["width"]
        return band and abs(band["x"] - want_left) < 3 and abs(band["x"] + band["width"] - want_right) < 3

    _wait_for(page, band_matches, "the shaded band to follow the slider")


CONTRAST = """(selector) => {
    const rgb = (css) => { const d = document.createElement('div'); d.style.color = css; document.body.appendChild(d);
        const c = getComputedStyle(d).color.match(/[\\d.]+/g).slice(0, 3).map(Number); d.remove(); return c; };
    const f = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; };
    const lum = ([r, g, b]) => {
        return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b); };
    const bg = lum(rgb(getComputedStyle(document.body).getPropertyValue('--jp-layout-color0')));
    return [...document.querySelectorAll(selector)].slice(0, 6).map((el) => {
        const s = getComputedStyle(el); const paint = el.tagName === 'text' || s.stroke === 'none' ? s.fill : s.stroke;
        const l = lum(rgb(paint)); return (Math.max(l, bg) + 0.05) / (Math.min(l, bg) + 0.05); });
}"""
# what a reader must see on either theme: the lines (loss, rebuilt, fractions, layers), tick labels and titles
READABLE = {
    "loss lines": ".lca-figure-loss path.line",
    "fraction lines": ".lca-figure-fractions path.line",
    "layer lines": ".lca-figure-cumulative path.line",
    "tick labels": ".lca-figure-loss .tick text",
    "titles": ".lca-explorer .mainheading",
    "axis labels": ".lca-explorer .axislabel",
}


def _contrasts(page) -> dict:
    return {name: page.evaluate(CONTRAST, sel) for name, sel in READABLE.items()}


def test_light_and_dark_themes_both_read(lab_page):
    lab, page = lab_page
    if not page.locator(".lca-explorer").count():
        _open_and_run_all(lab, page)
    assert page.evaluate("document.body.dataset.jpThemeLight") == "true"
    explorer = page.locator(".lca-explorer").first
    explorer.scroll_into_view_if_needed()
    page.mouse.move(1, 1)  # no hover: bqplot's toolbar and tooltips stay hidden in the pictures
    explorer.screenshot(path=str(ARTIFACTS / "explorer_light.png"))
    light = _contrasts(page)

    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Settings$")).click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Theme$")).first.hover()
    page.locator(".lm-Menu-item[data-command='apputils:change-theme']", has_text="JupyterLab Dark").first.click()
    page.wait_for_function("document.body.dataset.jpThemeLight === 'false'")
    _wait_for(page, lambda: _contrasts(page) != light, "the figures to take the dark theme's colours")
    explorer.scroll_into_view_if_needed()
    page.mouse.move(1, 1)
    explorer.screenshot(path=str(ARTIFACTS / "explorer_dark.png"))
    dark = _contrasts(page)
    for theme, found in (("light", light), ("dark", dark)):
        for name, ratios in found.items():
            assert ratios, f"nothing matched {READABLE[name]} ({theme})"
            assert min(ratios) >= 3.0, f"{name} on the {theme} theme: contrast {min(ratios):.2f} < 3 ({ratios})"
