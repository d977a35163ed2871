"""The README's dashboard screenshots, taken in headless Chromium from a real run folder.

    python benchmarks/dashboard_screenshots.py RUN_DIR [--out docs]

Renders the run's dashboard as ``psc-dashboard --snapshot`` would, into a temporary file (the run
folder is only read), opens it as a user does, and saves what it shows without any click:
``dashboard.png`` (fronts and the trial panel, opened on best.yaml's trial) and
``dashboard-views.png`` (3D view, hypervolume, parallel coordinates of the decisions).
Needs Debian's ``chromium`` and the ``playwright`` Python package.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from playwright.sync_api import sync_playwright

from psc_nas.dashboard import payload, render_page
from psc_nas.results import Run

WIDTH = 1400


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--out", default="docs")
    parser.add_argument("--storage", help="the study's storage, as psc-dashboard --storage")
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("dashboard_screenshots: no chromium binary (apt-get install chromium)")
    run = Run.open(args.run_dir, storage=args.storage)
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as playwright:
        page_file = Path(tmp) / "dashboard.html"
        page_file.write_text(render_page(payload(run)))
        browser = playwright.chromium.launch(executable_path=chromium, args=["--headless", "--no-sandbox"])
        page = browser.new_page(viewport={"width": WIDTH, "height": 1000})
        page.set_default_timeout(180_000)
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(page_file.as_uri())
        page.wait_for_function("() => document.getElementById('arch-title').textContent.startsWith('Trial')")
        page.wait_for_timeout(1500)  # plotly's last layout pass
        if errors:
            raise SystemExit(f"dashboard_screenshots: the page failed: {errors[0]}")

        def below(selector: str) -> float:
            box = page.locator(selector).bounding_box()
            return box["y"] + box["height"]

        opened = out / "dashboard.png"
        page.screenshot(
            path=str(opened), full_page=True, clip={"x": 0, "y": 0, "width": WIDTH, "height": below("#trial-panel") + 8}
        )
        top = page.locator("#view3d").bounding_box()["y"] - 8
        views = out / "dashboard-views.png"
        page.screenshot(
            path=str(views),
            full_page=True,
            clip={"x": 0, "y": top, "width": WIDTH, "height": below("#parcoords") + 8 - top},
        )
        browser.close()
    print(f"wrote {opened} and {views} from {run.path}")


if __name__ == "__main__":
    main()
