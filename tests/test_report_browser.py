"""A generated report opened in headless Chromium: every figure loads, nothing is wider than the page (at a
desktop and a narrow window), and the page raises no script errors."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from convdescent.data.synthetic import write_npz_dataset
from convdescent.report import build_report
from convdescent.train.run import train_from_config

CHROMIUM = next((p for p in (shutil.which("chromium"), shutil.which("chromium-browser"), "/usr/bin/chromium")
                 if p and Path(p).is_file()), None)

# Appended to a copy of the report: records script errors from the start, then, once everything has loaded,
# writes what it measured into the page, where --dump-dom shows it.
CATCH = """<script>
window.__errors = [];
window.addEventListener("error", e => window.__errors.push(String(e.message || e.type)), true);
</script>"""
PROBE = """
<script>
window.addEventListener("load", () => {
  const width = document.documentElement.clientWidth;
  const images = [...document.images].map(img => ({id: (img.closest("figure") || {}).id || img.alt,
      ok: img.complete && img.naturalWidth > 0, right: img.getBoundingClientRect().right}));
  const overflow = [...document.body.querySelectorAll("*")]
      .filter(el => el.getBoundingClientRect().right > width + 1 || el.scrollWidth > el.clientWidth + 1 && getComputedStyle(el).overflowX === "visible")
      .map(el => el.tagName + (el.id ? "#" + el.id : ""));
  const out = document.createElement("pre");
  out.id = "probe-result";
  out.textContent = JSON.stringify({width, scrollWidth: document.documentElement.scrollWidth, images, overflow,
                                    errors: window.__errors});
  document.body.appendChild(out);
});
</script>
"""


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    base = tmp_path_factory.mktemp("browser")
    arrays = write_npz_dataset(base / "d.npz", n=160, num_classes=4, shape=(1, 10, 10), classes=["w", "x", "y", "z"],
                               seed=2)
    y_test = arrays["y_test"].copy()
    y_test[::4] = (y_test[::4] + 1) % 4  # wrong labels, so there are misclassified images to show
    np.savez(base / "d.npz", **dict(arrays, y_test=y_test))
    res = train_from_config({"dataset": f"npz:{base / 'd.npz'}", "val_split": 32, "epochs": 2, "batch_size": 16,
                             "log_every": 2, "out": str(base / "runs"), "lr": 2e-3,
                             "name": "a-long-run-name-" + "x" * 60}, display="none")
    return build_report(res.run_dir)


def _probe(report: Path, width: int, tmp_path: Path) -> dict:
    assert CHROMIUM, "headless Chromium is needed (apt-get install chromium)"
    page = tmp_path / f"probe-{width}.html"
    text = report.read_text(encoding="utf-8")
    assert text.count("<body>") == 1 and text.count("</body>") == 1
    page.write_text(text.replace("<body>", "<body>" + CATCH).replace("</body>", PROBE + "</body>"), encoding="utf-8")
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--user-data-dir={tmp_path / f'profile-{width}'}", f"--window-size={width},2000",
                           "--virtual-time-budget=10000", "--dump-dom", page.as_uri()],
                          capture_output=True, text=True, timeout=180)
    m = re.search(r'<pre id="probe-result">(.*?)</pre>', proc.stdout, re.S)
    assert m, f"no probe result from Chromium (exit {proc.returncode}): {proc.stderr[-2000:]}"
    return json.loads(m.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">")
                      .replace("&amp;", "&"))


@pytest.mark.parametrize("width", [1280, 700])
def test_report_in_headless_chromium(report, tmp_path, width):
    result = _probe(report, width, tmp_path)
    figures = {i["id"] for i in result["images"]}
    assert {"loss-curves", "accuracy-curves", "learning-rate", "grad-norms", "confusion-matrix",
            "misclassified"} <= figures, figures
    assert all(i["ok"] for i in result["images"]), [i["id"] for i in result["images"] if not i["ok"]]
    assert result["scrollWidth"] <= result["width"] and not result["overflow"], result["overflow"]
    assert result["errors"] == []


def test_the_probe_sees_overflow_broken_images_and_errors(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><body><div style='width:3000px'>wide</div>"
                   "<figure id='gone'><img alt='gone' src='missing.png'></figure>"
                   "<script>undefined_function()</script></body></html>")
    result = _probe(bad, 1000, tmp_path)
    assert result["overflow"] and not result["images"][0]["ok"] and result["errors"]
