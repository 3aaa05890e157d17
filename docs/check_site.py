"""Open the built site's notebook pages in headless Chromium and check that their figures draw.

    .venv/bin/python docs/check_site.py SITE_DIR [--screenshots DIR]     # bash .ci/docs runs it

Each page that holds widget views must draw every bqplot figure its saved widget state holds (counted in the
state: Figure models that a view shows), with no page error; the site is served on 127.0.0.1, and requests to
any other host are refused, so what draws came from the site itself.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import re
import sys
import threading
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
STATE = re.compile(r'<script type="application/vnd\.jupyter\.widget-state\+json">(.*?)</script>', re.S)
VIEW = re.compile(r'<script type="application/vnd\.jupyter\.widget-view\+json">(.*?)</script>', re.S)


def expected_figures(html: str) -> int:
    """bqplot Figures shown by the page's widget views (directly or inside a box), from the saved state."""
    match = STATE.search(html)
    if not match:
        return 0
    models = json.loads(match.group(1))["state"]

    def figures(model_id: str) -> int:
        m = models.get(model_id, {})
        if m.get("model_name") == "FigureModel" and m.get("model_module") == "bqplot":
            return 1
        children = m.get("state", {}).get("children", [])
        return sum(figures(c.removeprefix("IPY_MODEL_")) for c in children if isinstance(c, str))

    return sum(figures(json.loads(v)["model_id"]) for v in VIEW.findall(html))


def main(site: Path, screenshots: Path | None) -> int:
    from playwright.sync_api import sync_playwright

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    root = f"http://127.0.0.1:{server.server_address[1]}/"
    failures = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        for page_path in sorted(site.rglob("*.html")):
            want = expected_figures(page_path.read_text(encoding="utf-8"))
            if not want:
                continue
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda e, errors=errors: errors.append(str(e)))
            page.route(re.compile(r"^https?://(?!127\.0\.0\.1)"), lambda route: route.abort())
            rel = page_path.relative_to(site).as_posix()
            page.goto(root + rel)
            try:
                page.wait_for_function(
                    f"document.querySelectorAll('div.bqplot.figure svg').length >= {want}", timeout=60_000
                )
                got = page.eval_on_selector_all("div.bqplot.figure", "els => els.length")
            except Exception as exc:
                got = page.eval_on_selector_all("div.bqplot.figure", "els => els.length")
                errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
            if screenshots is not None:
                screenshots.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(screenshots / (page_path.stem + ".png")), full_page=True)
            status = "ok" if got >= want and not errors else "FAILED"
            print(f"{status}: {rel}: {got} of {want} figures drawn" + (f"; {errors[:2]}" if errors else ""))
            if status != "ok":
                failures.append(rel)
            page.close()
        browser.close()
    server.shutdown()
    return 1 if failures else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("site", type=Path)
    parser.add_argument("--screenshots", type=Path, default=None)
    a = parser.parse_args()
    sys.exit(main(a.site, a.screenshots))
