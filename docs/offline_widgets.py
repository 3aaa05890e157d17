"""Serve the example notebooks' widgets from the site itself, so their figures draw with no CDN.

    .venv/bin/python docs/offline_widgets.py SITE_DIR      # after mkdocs build (bash .ci/docs runs it)

The executed notebooks keep their widgets' state; a browser draws them with @jupyter-widgets/html-manager
(an AMD module, under require.js), which loads each widget library by name. mkdocs-jupyter points both at
public CDNs, and bqplot's JavaScript for this bqplot (0.6.x, in the Python package) is not on npm, so no CDN
has it. This copies html-manager and require.js from the npm registry (`npm pack`, pinned below) and
bqplot's and bqscales' AMD bundles from their installed Python packages into SITE_DIR/assets/widgets/, and
points the notebook pages there.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

NPM = {"@jupyter-widgets/html-manager@1.0.15": "dist/embed-amd.js", "requirejs@2.3.8": "require.js"}
LIBRARIES = ("bqplot", "bqscales")  # AMD bundles under <prefix>/share/jupyter/nbextensions/<name>/index.js
RENDERER = re.compile(r"https://unpkg\.com/@jupyter-widgets/html-manager@[^'\"]*/dist/embed-amd\.js")
REQUIRE = re.compile(r'<script src="https://cdnjs\.cloudflare\.com/ajax/libs/require\.js/[^"]*"></script>')


def vendor(site: Path) -> Path:
    out = site / "assets" / "widgets"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for spec, member in NPM.items():
            name = subprocess.run(
                ["npm", "pack", "--silent", spec], cwd=tmp, check=True, capture_output=True, text=True
            ).stdout.split()[-1]
            with tarfile.open(Path(tmp) / name) as tar:
                source = tar.extractfile(f"package/{member}")
                assert source is not None, f"{spec} has no {member}"
                (out / Path(member).name).write_bytes(source.read())
                for info in tar.getmembers():  # the icon font of the widgets' CSS
                    if info.name.endswith(".woff2") and (font := tar.extractfile(info)) is not None:
                        (out / "fonts").mkdir(exist_ok=True)
                        (out / "fonts" / Path(info.name).name).write_bytes(font.read())
    for lib in LIBRARIES:
        bundle = Path(sys.prefix) / "share" / "jupyter" / "nbextensions" / lib / "index.js"
        if not bundle.is_file():
            raise FileNotFoundError(f"{bundle} is missing: install {lib} in this environment")
        (out / lib).mkdir(exist_ok=True)
        shutil.copyfile(bundle, out / lib / "index.js")
    return out


def rewrite(page: Path, site: Path) -> bool:
    """Point one page's widget scripts at the copies; False if it has no widgets."""
    html = page.read_text(encoding="utf-8")
    if not RENDERER.search(html):
        return False
    base = Path("../" * (len(page.relative_to(site).parts) - 1)) / "assets" / "widgets"
    paths = ", ".join(f'"{lib}": "{base.as_posix()}/{lib}/index"' for lib in LIBRARIES)
    local_require = (
        f'<script src="{base.as_posix()}/require.js"></script>\n'
        f"<script>require.config({{paths: {{{paths}}}}});</script>"
    )
    html, n = REQUIRE.subn(lambda _: local_require, html)
    if n != 1:
        raise ValueError(f"{page}: expected one require.js script (mkdocs-jupyter's include_requirejs), found {n}")
    html = RENDERER.sub(f"{base.as_posix()}/embed-amd.js", html)
    page.write_text(html, encoding="utf-8")
    fonts = page.parent / "@jupyter-widgets" / "html-manager" / "dist"  # where the bundled CSS asks for them
    fonts.mkdir(parents=True, exist_ok=True)
    for font in (site / "assets" / "widgets" / "fonts").glob("*.woff2"):
        shutil.copyfile(font, fonts / font.name)
    return True


def main(site: Path) -> list[Path]:
    vendor(site)
    return [p for p in sorted(site.rglob("*.html")) if rewrite(p, site)]


if __name__ == "__main__":
    pages = main(Path(sys.argv[1]))
    print(f"widgets served from the site on {len(pages)} page(s)")
