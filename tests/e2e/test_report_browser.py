"""The backtest report opened in a real headless Chromium: tables render, images decode.

Chromium comes from the distribution's ``chromium`` package (``make browser``, run by
``make test``, installs it when missing and possible); without it these tests skip.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from core.analytics import RunResult
from core.report_html import write_report

pytestmark = pytest.mark.e2e

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists()
                                        else None)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium not installed (`make browser` installs the Debian package `chromium`)")

# Appended to a *copy* of report.html (the report itself has no script): once the page has
# loaded, record for every <img> whether the browser decoded it, and its natural size.
PROBE = """<script>
window.addEventListener("load", () => {
  const out = document.createElement("pre");
  out.id = "img-probe";
  out.textContent = Array.from(document.images).map(
    (i) => `${i.id} ${i.complete} ${i.naturalWidth}x${i.naturalHeight}`).join("\\n");
  document.body.appendChild(out);
});
</script>"""


def _trade(cid: str, date: str, entry: str, exit_: str, net: int, strategy: str,
           reason: str, side: str = "buy") -> dict:
    return {
        "client_order_id": cid, "exit_client_order_id": f"{cid}-x1", "date": date,
        "symbol": "SPY", "side": side, "qty": 5,
        "entry_time": f"{date}T{entry}:00-05:00", "exit_time": f"{date}T{exit_}:00-05:00",
        "entry_price": "270.00", "exit_price": "271.00", "exit_reason": reason,
        "gross_pnl_cents": net + 70, "fees_cents": 70, "pnl_cents": net,
        "strategy": strategy, "confidence": 0.7,
    }


def _report(tmp_path: Path) -> Path:
    trades = [
        _trade("a", "2019-02-11", "09:45", "10:15", 930, "orb", "peak"),
        _trade("b", "2019-02-11", "10:00", "10:30", -570, "vwap", "stop_loss", "sell"),
        _trade("c", "2019-02-12", "10:00", "11:00", 230, "orb", "eod"),
        _trade("d", "2019-02-13", "11:00", "15:50", -120, "vwap", "eod", "sell"),
    ]
    days = [{"date": d, "max_used_capital_cents": 300_000, "used_capital_cents": 0,
             "daily_limit_cents": 500_000, "open_positions_at_close": 0,
             "close_time": f"{d}T16:00:00-05:00"}
            for d in ("2019-02-11", "2019-02-12", "2019-02-13")]
    runs = {"strategy": RunResult(trades, days, 500_000),
            "random <entries>": RunResult(trades[1::2], days, 500_000)}
    return write_report(tmp_path / "report", runs, 10_000_000).html


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [CHROMIUM, "--headless=new", "--disable-gpu", "--no-sandbox",
           "--no-first-run", "--no-default-browser-check", "--disable-extensions",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}"
    return proc


@needs_chromium
def test_report_dom_and_decoded_images(tmp_path: Path) -> None:
    html_path = _report(tmp_path)
    page = html_path.read_text(encoding="utf-8")

    dom = _chromium(tmp_path, "--dump-dom", html_path.as_uri()).stdout
    assert '<table id="stats">' in dom
    assert re.search(r"<th>Net P/L</th>\s*<td[^>]*>\$4\.70</td>", dom), "net P/L row missing"
    assert "random &lt;entries&gt;" in dom
    for table in ("by-strategy", "by-exit-reason"):
        assert f'<table id="{table}">' in dom
    imgs = re.findall(r'<img id="([\w-]+)"[^>]* src="data:image/png;base64,', dom)
    assert imgs == ["equity-plot", "daily-plot", "breakdown-plot", "histogram-plot"]

    probed = html_path.with_name("probe.html")
    probed.write_text(page.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dom = _chromium(tmp_path, "--dump-dom", probed.as_uri()).stdout
    found = re.search(r'<pre id="img-probe">(.*?)</pre>', dom, re.S)
    assert found, "the probe did not run"
    decoded = {}
    for line in found.group(1).strip().splitlines():
        name, complete, size = line.split()
        w, h = (int(x) for x in size.split("x"))
        assert complete == "true" and w > 0 and h > 0, f"image not decoded: {line}"
        decoded[name] = (w, h)
    assert set(decoded) == set(imgs)
    assert decoded["equity-plot"] == (1000, 550)  # 10 x 5.5 inches at 100 dpi


@needs_chromium
def test_report_screenshot_renders(tmp_path: Path) -> None:
    import numpy as np
    from matplotlib.image import imread

    html_path = _report(tmp_path)
    shot = tmp_path / "shot.png"
    _chromium(tmp_path, "--window-size=1200,2400", "--hide-scrollbars",
              f"--screenshot={shot}", html_path.as_uri())
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = imread(shot)
    assert pixels.shape[:2] == (2400, 1200)
    # the plots put plenty of coloured (not grey/white) pixels on the page: a page whose
    # images failed to decode shows only text and table borders
    rgb = pixels[..., :3]
    coloured = (rgb.max(axis=2) - rgb.min(axis=2)) > 0.25
    assert int(np.count_nonzero(coloured)) > 20_000  # ~125k here; ~100 without images
