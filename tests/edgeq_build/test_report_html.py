"""The build's HTML report renders in a real browser (headless Chromium) without console errors.

Chromium is Debian's ``chromium`` package (tools/setup.sh installs it when missing). Console
messages reach stderr with ``--enable-logging=stderr --v=0`` as ``CONSOLE`` lines; the report has
no scripts, so any console line is a failure. The screenshot is kept in test-artifacts/.
"""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from edgeq.report.html import render

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium; tools/setup.sh does it)")
    return exe


def _headless(page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args, page.resolve().as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def console_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ":CONSOLE" in ln]


def test_report_renders_in_chromium_without_console_errors(built, tmp_path):
    page = built.report
    html = page.read_text()
    # self-contained: no scripts, no stylesheets or images fetched from anywhere
    assert "<script" not in html and "<link" not in html and "<img" not in html
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "build-report.png"
    shot.unlink(missing_ok=True)
    res = _headless(page, tmp_path / "profile", "--window-size=1100,3200", f"--screenshot={shot}")
    assert res.returncode == 0, res.stderr[-2000:]
    assert console_lines(res.stderr) == []
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000  # a rendered page, not a blank one
    dom = _headless(page, tmp_path / "profile", "--dump-dom")
    assert dom.returncode == 0 and console_lines(dom.stderr) == []
    for heading in ("Summary", "Sizes against the ideal", "Fidelity per output and per model", "Per-layer error",
                    "Quantization plan", "Host latency (ONNX Runtime CPU)", "Versions and hashes"):
        assert f"<h2>{heading}</h2>" in dom.stdout, heading
    assert dom.stdout.count("<svg") == 3  # sizes, per-layer SQNR, latency
    assert dom.stdout.count("<circle") >= 5  # the per-layer plot has its points


def test_the_console_check_catches_an_error(tmp_path):
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><body><script>console.error("edgeq-test-error")</script></body></html>')
    res = _headless(page, tmp_path / "profile", f"--screenshot={tmp_path / 'bad.png'}")
    assert any("edgeq-test-error" in ln for ln in console_lines(res.stderr))


def test_render_handles_infinite_sqnr_and_missing_latency(built):
    import copy

    data = copy.deepcopy(built.data)
    data["latency"] = None
    for c in data["validation"]["candidates"]:
        for r in c["intermediates"]:
            r["sqnr_db"] = "inf"  # build.json writes non-finite floats as strings
    html = render(data)
    assert "not measured" in html and "<svg" in html
