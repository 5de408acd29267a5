"""Issue 18, part 2: every saved artifact carries report.html, a self-contained page a person opens in a browser.

Checked in a real browser: headless Chromium (Debian's ``chromium``; installed here with apt-get where missing and
possible, skipped with the reason otherwise) loads the page of a small model from disk with the network off; the
page's own script reports script errors, the chart sizes and readiness into ``<body data-*>``, which
``--dump-dom`` returns after the scripts ran. The plan table must have one row per layer and every chart a
non-zero size. A screenshot goes to the test's temp dir.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import torch

import lowbit

from models import SmallResNet, cnn_cal, randomize_bn

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if shutil.which("apt-get") is None:
        pytest.skip("no chromium and no apt-get to install it")
    try:
        subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], check=True, capture_output=True, timeout=600)
    except (subprocess.SubprocessError, OSError) as e:
        pytest.skip(f"chromium could not be installed: {e}")
    found = shutil.which("chromium")
    if not found:
        pytest.skip("apt-get installed chromium but no chromium binary is on PATH")
    return found


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    torch.manual_seed(0)
    model = randomize_bn(SmallResNet())
    q = lowbit.compile(model, cnn_cal(1)[0], target="onnxruntime-int8", calibration=cnn_cal(2), progress=False)
    return q, q.save(tmp_path_factory.mktemp("html") / "cnn")


def test_every_artifact_carries_a_self_contained_report(artifact) -> None:
    q, d = artifact
    page = (d / "report.html").read_text()
    assert "<svg" in page and "<table" in page
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing fetched from the network
    assert page.count('<tr class="layer') == len(q.report.layers)


def test_report_opens_in_a_browser(artifact, tmp_path) -> None:
    chromium = _chromium()
    q, d = artifact
    url = (d / "report.html").resolve().as_uri()
    user = tmp_path / "profile"
    dom = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={user}", "--virtual-time-budget=3000",
                          "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", dom.stdout)
    assert body, dom.stdout[:500]
    attrs = dict(re.findall(r'data-(\w+)="([^"]*)"', body.group(1)))
    assert attrs.get("ready") == "1" and attrs.get("errors") == "", attrs
    sizes = [tuple(int(v) for v in s.split("x")) for s in attrs["charts"].split()]
    assert sizes and all(w > 0 and h > 0 for w, h in sizes), sizes
    assert dom.stdout.count('<tr class="layer') == len(q.report.layers)
    shot = tmp_path / "report.png"
    run = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={user}", f"--screenshot={shot}",
                          "--window-size=1280,1400", url], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and shot.is_file() and shot.stat().st_size > 10_000, run.stderr[-2000:]
    print(f"\n[report.html] {len(q.report.layers)} plan rows, charts {sizes}, screenshot {shot}")
