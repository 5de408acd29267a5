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
from pathlib import Path

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
    root = tmp_path_factory.mktemp("html")
    q = lowbit.compile(model, cnn_cal(1)[0], target="onnxruntime-int8", calibration=cnn_cal(2), progress=False,
                       config=lowbit.QuantConfig(sensitivity=True), dump_dir=root / "dump")
    q.float_model = model
    return q, q.save(root / "cnn")


def test_report_states_size_fidelity_on_the_engine_and_links_the_dumps(artifact) -> None:
    from lowbit.runtime.qparams import cosine, sqnr

    q, d = artifact
    x = cnn_cal(1)[0]
    with torch.no_grad():
        ref, out = q.float_model(*x), q(*x)
    fid = q.report.sections["fidelity"]
    # measured on the ORT engine, not the reference: the same figures as an independent call (1e-6 dB)
    assert abs(fid["sqnr_db"] - sqnr(ref, out)) < 1e-6 and abs(fid["cosine"] - cosine(ref, out)) < 1e-9
    assert 30.0 < fid["sqnr_db"] < 80.0
    facts = q.report.sections["model"]
    assert facts["parameters"] == sum(p.numel() for p in q.float_model.parameters())
    assert facts["float_bytes"] == sum(t.numel() * 4 for t in [*q.float_model.parameters(),
                                                               *q.float_model.buffers()] if t.is_floating_point()) \
        + sum(t.numel() * 8 for t in q.float_model.buffers() if not t.is_floating_point())
    page = (d / "report.html").read_text()
    size = sum(f.stat().st_size for f in d.iterdir() if f.name not in ("manifest.json", "timings.json", "report.html"))
    assert f"{size / 1e6:.3g} MB artifact" in page and f"{facts['float_bytes'] / 1e6:.3g} MB float" in page
    assert f"output SQNR <b>{fid['sqnr_db']:.1f} dB</b>" in page
    plan = q.report.sections["plan"]  # the plan's target checked on the engine too (issue 19), shown beside it
    assert f"<b>{plan['engine_fidelity']:.4g}</b> on the engine (target met" in page
    assert page.count('<svg class="chart"') == 2  # per-layer error and sensitivity
    links = re.findall(r'href="(file://[^"]+)"', page)
    assert links and len(links) == 3 * len(q.report.passes)
    from urllib.parse import unquote, urlparse

    assert all(Path(unquote(urlparse(u).path)).is_file() for u in links)


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
