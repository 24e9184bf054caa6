"""The HTML card in a real browser: headless Chromium loads it with no console message, no
request, no live injected content, and the overview lists every check.

Chromium comes from Debian's ``chromium`` package; ``make test`` installs it when it is missing
(the machines run as root). Without it these tests fail and say how to install it.
Every console message (errors, CSP violations: a blocked request or inline script is one) is
logged to stderr with ``--enable-logging=stderr``; the control page proves the detector sees
them.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from mmsafe.report import render_html
from tests.test_report import _overview_card

FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--disable-extensions",
    "--host-resolver-rules=MAP * ~NOTFOUND", "--enable-logging=stderr", "--v=0",
)  # fmt: skip
CONSOLE = re.compile(r":CONSOLE[:(]\d*\)?\]? (.*)")


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail(
            "No Chromium for the browser tests. Install it with `apt-get install -y "
            "--no-install-recommends chromium` (as root; `make test` does this when it can)."
        )
    return path


def _load(chromium: str, page: Path, *extra: str) -> tuple[str, list[str]]:
    """``(DOM after load, console messages)`` of ``page`` in headless Chromium."""
    run = subprocess.run(
        [chromium, *FLAGS, *extra, "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout, [m.group(1) for m in CONSOLE.finditer(run.stderr)]


class _Dom(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, Any]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, Any]]) -> None:
        self.tags.append((tag, dict(attrs)))


def _tags(dom: str) -> list[tuple[str, dict[str, Any]]]:
    parser = _Dom()
    parser.feed(dom)
    return parser.tags


def test_the_detector_sees_requests_scripts_and_errors(chromium, tmp_path) -> None:
    """Control: a page that requests, runs a script and logs an error is caught on each."""
    page = tmp_path / "bad.html"
    page.write_text(
        "<!doctype html><html><head><meta http-equiv='Content-Security-Policy' content="
        "\"default-src 'none'; img-src data:\"></head><body><p>x</p>"
        "<img src='https://example.invalid/x.png'><script>console.error('boom')</script>"
        "</body></html>",
        encoding="utf-8",
    )
    _, messages = _load(chromium, page)
    assert any("example.invalid" in m for m in messages), messages
    assert any("inline script" in m.lower() for m in messages), messages
    page.write_text("<!doctype html><body><script>console.error('boom')</script>")
    _, messages = _load(chromium, page)
    assert any("boom" in m for m in messages), messages


def test_the_card_loads_clean_and_injected_strings_stay_inert(chromium, tmp_path) -> None:
    evil = '<img src=x onerror="console.error(1)"><script>console.error(2)</script>'
    card = _overview_card()
    card["model"]["name"] = evil
    card["checks"]["monitoring.ood"]["findings"] = [
        {"severity": "high", "message": evil, "evidence": {}, "remediation": evil}
    ]
    card["checks"]["monitoring.ood"]["plots"] = {
        "g": {"kind": "images", "title": evil, "items": [{"png": "iVBO", "caption": evil}]},
        "b": {"kind": "bar", "title": evil, "labels": [evil], "values": [0.5]},
        "t": {"kind": "table", "columns": [evil], "rows": [[evil]] * 20},
    }
    page = tmp_path / "index.html"
    page.write_text(render_html(card), encoding="utf-8")
    dom, messages = _load(chromium, page)
    assert messages == []  # no console error, no blocked request, no script
    tags = _tags(dom)
    assert not [t for t, _ in tags if t == "script"]
    assert not [a for _, a in tags if any(k.startswith("on") for k in a)]
    assert not [a for t, a in tags if t == "img" and a.get("src") == "x"]
    assert dom.count("&lt;script&gt;") >= 5  # shown as text
    overview = dom[dom.index('id="overview"') : dom.index('id="pillar-')]
    for name in card["checks"]:
        assert f'href="#check-{name.replace(".", "-")}"' in overview, name


def test_the_overview_screenshot_renders(chromium, tmp_path) -> None:
    page = tmp_path / "index.html"
    page.write_text(render_html(_overview_card()), encoding="utf-8")
    shot = tmp_path / "shot.png"
    subprocess.run(
        [chromium, *FLAGS, f"--screenshot={shot}", "--window-size=1200,900", page.as_uri()],
        capture_output=True, timeout=120, check=True,
    )  # fmt: skip
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size == (1200, 900)
        colours = im.convert("RGB").getcolors(1 << 20) or []
    # the verdict badges' red (fail) and orange (warn) are painted
    painted = {c for _, c in colours}
    assert (0xC6, 0x28, 0x28) in painted and (0xEF, 0x6C, 0x00) in painted
