"""Latency of the explorer for T=2000 x P=100k: Python side (a control change to every mark updated: data
computed, reduced, set under hold_sync and serialized) and, with ``--browser``, in JupyterLab in headless
Chromium (a key press on the range slider to every figure updated in the DOM), and the build time.

    .venv/bin/python benchmarks/bench_explorer.py [--iterations 2000] [--moves 30] [--browser [--presses 30]]

The result is synthetic (lca_notebook.result.from_arrays): three Linear layers (324 -> 256 -> 64 -> 10,
100,298 parameters), LCA decaying over training with a fifth of the entries exactly zero. Prints
medians and 90th percentiles; the targets are a median <= 100 ms from key press to DOM and a build <= 1 s.

In the browser, a capture-phase keydown listener stamps the press and a MutationObserver on each figure
stamps its last change; a press counts once every figure has changed and the page has been quiet for
0.4 s (the kernel writes its own update time per press beside it). Needs Debian's chromium and Playwright
(as tests/test_browser.py); takes a few minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lca_notebook.result import from_arrays
from lca_notebook.widgets import Explorer

LAYERS = [("fc1", 324, 256), ("fc2", 256, 64), ("fc3", 64, 10)]


def synthetic_result(t: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    coords = {"tensor": [], "layer": [], "unit": [], "index": []}
    for name, fan_in, fan_out in LAYERS:
        for kind, n in (("weight", fan_in * fan_out), ("bias", fan_out)):
            coords["tensor"] += [f"{name}.{kind}"] * n
            coords["layer"] += [name] * n
            coords["unit"] += list(np.arange(n) // (n // fan_out))
            coords["index"] += list(range(n))
    p = len(coords["tensor"])
    lca = np.empty((t, p), dtype=np.float32)
    scale = (1e-4 * np.exp(-np.arange(t) / (t / 4)) + 1e-6).astype(np.float32)
    for t0 in range(0, t, 250):  # in blocks: keeps the temporaries small
        block = rng.standard_normal((min(250, t - t0), p), dtype=np.float32)
        block -= 0.1
        block *= scale[t0 : t0 + len(block), None]
        block[rng.random(block.shape) < 0.2] = 0.0
        lca[t0 : t0 + len(block)] = block
    loss = 2.3 + np.concatenate([[0.0], np.cumsum(lca.sum(1, dtype=np.float64))])
    return from_arrays(lca, loss, coords, attrs={"method": "synthetic"})


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


FIGURES = ("loss", "residual", "fractions", "cumulative", "layers", "heatmap", "histogram")
OBSERVE = """(names) => {
    window.__lca = {t0: null, last: {}};
    document.addEventListener('keydown', () => { window.__lca.t0 = performance.now(); window.__lca.last = {}; }, true);
    for (const name of names) {
        const el = document.querySelector('.lca-figure-' + name);
        new MutationObserver(() => { if (window.__lca.t0 !== null) window.__lca.last[name] = performance.now(); })
            .observe(el, {subtree: true, childList: true, attributes: true, characterData: true});
    }
}"""
CELL = """import json, sys, time
sys.path.insert(0, {bench!r})
from bench_explorer import synthetic_result
from lca_notebook.widgets import Explorer
result = synthetic_result({t})
t0 = time.perf_counter()
ex = Explorer(result)
built = time.perf_counter() - t0
log = open({log!r}, "a")
log.write(json.dumps({{"build_s": built}}) + "\\n"); log.flush()
_update = ex.update
def timed_update():
    t0 = time.perf_counter(); _update()
    log.write(json.dumps({{"update_ms": (time.perf_counter() - t0) * 1e3, "range": ex.range.value}}) + "\\n"); log.flush()
ex.update = timed_update
ex"""


def browser(t: int, presses: int) -> dict:
    """Key press on the slider's upper handle to every figure updated in the DOM, in JupyterLab."""
    import nbformat
    from playwright.sync_api import sync_playwright

    tests = Path(__file__).resolve().parent.parent / "tests"
    sys.path.insert(0, str(tests))
    from browser_utils import CHROMIUM, CHROMIUM_ARGS, JupyterLab, write_lab_settings

    with tempfile.TemporaryDirectory() as tmp:
        root, log = Path(tmp) / "lab", Path(tmp) / "kernel.jsonl"
        write_lab_settings(Path(tmp) / "settings", theme=None)
        root.mkdir()
        os.environ["JUPYTERLAB_SETTINGS_DIR"] = str(Path(tmp) / "settings")
        os.environ["JUPYTERLAB_WORKSPACES_DIR"] = str(Path(tmp) / "workspaces")
        nb = nbformat.v4.new_notebook()
        nb.cells = [nbformat.v4.new_code_cell(CELL.format(bench=str(Path(__file__).parent), t=t, log=str(log)))]
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, root / "bench.ipynb")
        with JupyterLab(root, log=Path(tmp) / "lab.log") as lab, sync_playwright() as pw:
            chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            page = chromium.new_page(viewport={"width": 1600, "height": 2000})
            page.set_default_timeout(300_000)
            page.goto(f"{lab.url}/lab/tree/bench.ipynb?token={lab.token}")
            page.locator(".jp-StatusBar-TextItem", has_text=re.compile(r"\| Idle")).first.wait_for()
            page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
            page.locator('.lm-Menu-item[data-command="runmenu:run-all"]').click()
            page.wait_for_function(f"document.querySelectorAll('div.bqplot.figure').length == {len(FIGURES)}")
            page.locator(".lca-explorer").first.scroll_into_view_if_needed()
            page.wait_for_function(
                "document.querySelector('.lca-figure-loss path.line')?.getAttribute('d')?.length > 100"
            )
            page.wait_for_timeout(2000)  # the first drawing settles before the observers start
            page.evaluate(OBSERVE, list(FIGURES))
            handle = page.locator(".noUi-handle-upper").first
            handle.focus()
            latencies, missing = [], []
            for i in range(presses):
                page.keyboard.press("ArrowLeft")
                want = f"iterations [0, {t - i - 1})"
                page.wait_for_function(f"document.querySelector('.lca-summary').innerText.includes({want!r})")
                page.wait_for_function(  # every figure changed, then 0.4 s without a change
                    f"""() => {{ const s = window.__lca; const names = Object.keys(s.last);
                        return names.length == {len(FIGURES)} && performance.now() - Math.max(...Object.values(s.last)) > 400; }}""",
                    timeout=30_000,
                )
                done = page.evaluate(
                    "() => { const s = window.__lca; return Math.max(...Object.values(s.last)) - s.t0; }"
                )
                latencies.append(done)
            kernel = [json.loads(line) for line in log.read_text().splitlines()]
            chromium.close()
    return {
        "press_to_dom_ms": latencies,
        "kernel_update_ms": [k["update_ms"] for k in kernel if "update_ms" in k],
        "kernel_build_s": next(k["build_s"] for k in kernel if "build_s" in k),
        "missing": missing,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=2000)
    ap.add_argument("--moves", type=int, default=30)
    ap.add_argument("--browser", action="store_true", help="also measure in JupyterLab + headless Chromium")
    ap.add_argument("--presses", type=int, default=30)
    args = ap.parse_args()
    rng = np.random.default_rng(1)

    t0 = time.perf_counter()
    result = synthetic_result(args.iterations)
    made = time.perf_counter() - t0
    t0 = time.perf_counter()
    ex = Explorer(result)
    built = time.perf_counter() - t0
    T, P = result.n_iterations, result.n_parameters
    print(
        f"result: T={T} x P={P} ({T * P * 4 / 1e9:.2f} GB float32), made in {made:.1f} s; explorer built in {built:.1f} s "
        f"(parameter prefix kept every {ex._parameters.stride} iterations)"
    )

    def slider_moves(label):
        times = []
        for _ in range(args.moves):
            a, b = sorted(rng.choice(T + 1, size=2, replace=False))
            times.append(timed(lambda: setattr(ex.range, "value", (int(a), int(b)))))
        return label, times

    rows = []
    for by in ("parameter", "unit", "tensor", "layer"):
        ex.granularity.value = by
        rows.append(slider_moves(f"slider move, by {by}, all layers"))
    ex.granularity.value = "parameter"
    ex.layer.value = "fc1"
    rows.append(slider_moves("slider move, by parameter, layer fc1"))
    ex.layer.value = None

    grans = []
    for _ in range(args.moves // 3 + 1):
        for by in ("unit", "tensor", "layer", "parameter"):
            grans.append(timed(lambda: setattr(ex.granularity, "value", by)))
    rows.append(("granularity change", grans))
    layers = []
    for _ in range(args.moves // 4 + 1):
        for name in ("fc1", "fc2", "fc3", None):
            layers.append(timed(lambda: setattr(ex.layer, "value", name)))
    rows.append(("layer change", layers))
    smooth = [timed(lambda: setattr(ex.smoothing, "value", int(w))) for w in rng.integers(1, 200, args.moves)]
    rows.append(("smoothing change", smooth))

    print(f"{'control change -> all marks updated':42s} {'n':>4s} {'median ms':>10s} {'p90 ms':>8s} {'max ms':>8s}")
    for label, times in rows:
        times = np.asarray(times)
        print(
            f"{label:42s} {len(times):4d} {np.median(times):10.1f} {np.percentile(times, 90):8.1f} {times.max():8.1f}"
        )
    sent = sum(
        np.asarray(getattr(m, k)).size
        for m in ex.marks.values()
        for k in ("x", "y", "color")
        if getattr(m, k, None) is not None
    )
    print(f"values held by all marks after the last change: {sent} (vs T x P = {T * P})")
    if not args.browser:
        return
    found = browser(args.iterations, args.presses)
    press, kern = np.asarray(found["press_to_dom_ms"]), np.asarray(found["kernel_update_ms"])
    print(f"\nbrowser (JupyterLab, headless Chromium): explorer built in the kernel in {found['kernel_build_s']:.2f} s")
    print(f"{'slider key press':42s} {'n':>4s} {'median ms':>10s} {'p90 ms':>8s} {'max ms':>8s}")
    for label, times in (
        ("press -> every figure updated in the DOM", press),
        ("kernel: update() for that press", kern),
    ):
        print(
            f"{label:42s} {len(times):4d} {np.median(times):10.1f} {np.percentile(times, 90):8.1f} {times.max():8.1f}"
        )


if __name__ == "__main__":
    main()
