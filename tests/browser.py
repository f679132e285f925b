"""Open a page the pipeline wrote in a real browser (Debian's chromium-headless-shell, driven by Playwright) and read
it back as a person sees it: what the console said, whether every image decoded, and the rendered text of every
table and list item under each heading, in the shape of report_reader.html_sections."""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

BROWSER = "chromium-headless-shell"  # installed by `bash run.sh setup` (apt)

# Run in the page after it loaded: each image's decoded width, and the rendered text (innerText) of the tables and
# list items that follow each h2, as html_sections gives them from the source.
_READ = """() => {
  const images = [...document.images].map(i => ({src: i.src.slice(0, 40), ok: i.complete && i.naturalWidth > 0}));
  const sections = {};
  let heading = null;
  for (const el of document.body.querySelectorAll("h2, table, li")) {
    if (el.tagName === "H2") { heading = el.innerText; sections[heading] = {tables: [], items: []}; continue; }
    if (heading === null) continue;
    if (el.tagName === "LI") { sections[heading].items.push(el.innerText); continue; }
    sections[heading].tables.push([...el.rows].map(r => [...r.cells].map(c => c.innerText)));
  }
  const table = document.querySelector("table");
  const box = table ? table.getBoundingClientRect() : null;
  return {images, sections, width: document.documentElement.scrollWidth,
          firstTable: box ? {top: box.top, bottom: box.bottom} : null};
}"""


@dataclass
class Rendered:
    console: list[str] = field(default_factory=list)  # console errors and warnings, uncaught page errors
    images: list[dict[str, Any]] = field(default_factory=list)
    sections: dict[str, dict[str, list]] = field(default_factory=dict)
    width: int = 0  # the page's scroll width at a 1280 px window (wider: it overflows sideways)
    first_table: dict[str, float] | None = None  # where the first table lies on the page (px from the top), unscrolled


def browser_path() -> str:
    """The browser binary; skipped where it cannot be installed, but never under CI, where setup must provide it."""
    found = shutil.which(BROWSER)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{BROWSER} is missing: `bash run.sh setup` installs it (apt-get install {BROWSER})")
        pytest.skip(f"{BROWSER} is not installed (bash run.sh setup installs it with apt)")
    return found


def render(page_file: Path, screenshot: Path) -> Rendered:
    """Load `page_file` in the browser, keep a full-page screenshot at `screenshot`, and read it back."""
    from playwright.sync_api import sync_playwright

    rendered = Rendered()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path(), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda m: rendered.console.append(f"{m.type}: {m.text}")
                    if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: rendered.console.append(f"page error: {e}"))
            page.goto(page_file.resolve().as_uri(), wait_until="load")
            read = page.evaluate(_READ)
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    rendered.images, rendered.sections, rendered.width = read["images"], read["sections"], read["width"]
    rendered.first_table = read["firstTable"]
    return rendered
