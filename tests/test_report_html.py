"""``mixkd study report --html``: one self-contained page, opened in a real browser (headless Chromium,
Debian's ``chromium`` package, which CI installs): from the page's DOM and a screenshot, every figure
rendered and the claims table is there."""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from optional import need_chromium
from PIL import Image
from test_study_report import fabricated_study

from mixkd.cli import main

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
         "--force-device-scale-factor=1"]
# Added to a copy of the page (never to the report itself): once the page has loaded, each image's natural
# size and place on the page, as attributes the dumped DOM shows.
PROBE = """<script>
window.addEventListener("load", () => {
  document.body.setAttribute("data-height", document.documentElement.scrollHeight);
  for (const img of document.images) {
    const r = img.getBoundingClientRect();
    img.setAttribute("data-natural", img.naturalWidth + "x" + img.naturalHeight);
    img.setAttribute("data-box", [r.left + scrollX, r.top + scrollY, r.width, r.height].map(Math.round).join(","));
  }
});
</script>"""


def chromium(page: Path, profile: Path, *extra: str) -> str:
    done = subprocess.run([need_chromium(), *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=5000", *extra,
                           page.as_uri()], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


class Page(HTMLParser):
    """The tags of a dumped DOM: images with their attributes, tables with their header cells."""

    def __init__(self, text: str):
        super().__init__()
        self.images, self.tables, self.headings, self._cells, self._heading = [], [], [], None, None
        self._in_header = False
        self.body: dict[str, str] = {}
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs)
        elif tag == "body":
            self.body = attrs
        elif tag == "table":
            self._cells = []
            self.tables.append(self._cells)
        elif tag == "th" and self._cells is not None:
            self._cells.append("")
            self._in_header = True
        elif tag in ("h1", "h2", "h3"):
            self._heading = ""

    def handle_endtag(self, tag):
        if tag == "table":
            self._cells = None
        elif tag == "th":
            self._in_header = False
        elif tag in ("h1", "h2", "h3") and self._heading is not None:
            self.headings.append(self._heading)
            self._heading = None

    def handle_data(self, data):
        if self._heading is not None:
            self._heading += data
        if self._in_header:
            self._cells[-1] += data


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """The fabricated study's HTML report, moved alone to another folder and opened there."""
    root = tmp_path_factory.mktemp("html")
    folder = fabricated_study(root / "study")
    assert main(["study", "report", str(folder), "--html"]) == 0
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (folder / "report.md").read_text())
    alone = root / "elsewhere"
    alone.mkdir()
    shutil.copy(folder / "report.html", alone / "report.html")  # no figure files beside it
    probed = alone / "probed.html"
    probed.write_text((alone / "report.html").read_text().replace("</body>", PROBE + "</body>"))
    page = Page(chromium(probed, root / "profile-dom", "--window-size=1280,1000", "--dump-dom"))  # the same width
    height = int(page.body["data-height"])
    shot = alone / "screenshot.png"
    chromium(probed, root / "profile-shot", f"--screenshot={shot}", f"--window-size=1280,{height}")
    return folder, figures, page, np.asarray(Image.open(shot).convert("RGB")).astype(int)


def test_the_html_report_holds_every_figure_embedded(rendered):
    folder, figures, page, _ = rendered
    assert {"heatmap.png", "top1-vs-temperature.png", "top1-vs-fraction.png", "claims-intervals.png"} <= set(figures)
    html = (folder / "report.html").read_text()
    assert len(page.images) == len(figures) and html.count('src="data:image/png;base64,') == len(figures)
    assert not re.search(r'(src|href)="(?!data:)', html)  # nothing fetched from elsewhere


def test_every_figure_rendered_in_the_browser(rendered):
    folder, figures, page, screenshot = rendered
    for img, name in zip(page.images, figures, strict=True):
        width, height = map(int, img["data-natural"].split("x"))
        with Image.open(folder / name) as png:
            assert (width, height) == png.size, name  # decoded by the browser at the PNG's own size
        x, y, w, h = map(int, img["data-box"].split(","))
        assert w > 100 and h > 100, name
        on_screen = screenshot[y:y + h, x:x + w].mean(axis=2)
        with Image.open(folder / name) as png:  # the figure itself, at the size the page shows it
            expected = np.asarray(png.convert("RGB").resize((w, h), Image.Resampling.BILINEAR)).astype(int).mean(axis=2)
        assert on_screen.std() > 5, name  # not a blank box
        # the pixels on the screen are the figure's (a broken-image icon or another figure correlate far less)
        assert np.corrcoef(on_screen.ravel(), expected.ravel())[0, 1] > 0.9, name


def test_the_claims_table_and_the_comparisons_are_there(rendered):
    _, _, page, _ = rendered
    assert "Claims" in page.headings and "Each comparison's difference and 95% interval" in page.headings
    headers = [[cell.strip() for cell in table] for table in page.tables]
    [claims] = [h for h in headers if h[:2] == ["#", "claim"]]  # the claims table: one row per claim, its verdict
    assert claims[-1] == "parts" and claims[2].startswith("verdict")
    assert ["#", "teacher → student", "comparison", "A", "B", "A − B", "95% interval", "basis", "verdict"] in headers
