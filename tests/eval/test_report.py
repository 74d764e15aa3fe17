"""The HTML report: self-contained, complete, and rendered by a real headless Chromium."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from lynx.db.tracking import Tracker
from lynx.evaluation import Evaluator, collect_source, render_report
from lynx.evaluation.evaluator import local_copy
from tests.eval.conftest import write_manifest

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
]


def find_chromium() -> str | None:
    """LYNX_TEST_CHROMIUM, else Debian's /usr/bin/chromium, else one on PATH."""
    for candidate in (
        os.environ.get("LYNX_TEST_CHROMIUM"),
        "/usr/bin/chromium",
        "chromium",
        "chromium-browser",
        "google-chrome",
    ):
        if candidate and (found := shutil.which(candidate)):
            return found
    return None


@pytest.fixture(scope="module")
def chromium() -> str:
    found = find_chromium()
    if found is None:
        reason = "no headless Chromium: run scripts/ensure-chromium.sh or set LYNX_TEST_CHROMIUM"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(reason)  # CI must exercise the browser, never skip it silently
        pytest.skip(reason)
    return found


@pytest.fixture(scope="module")
def report(tmp_path_factory, clips, face_models_dir) -> Path:
    """The report of the three clips plus a missing file, with the gate on at 0.5."""
    from lynx.settings import LynxSettings

    home = tmp_path_factory.mktemp("report-home")
    settings = LynxSettings(
        _env_file=None,
        home=home,
        models_dir=face_models_dir,
        face_device="cpu",
        eval_frame_stride=2,
        quality_gate_threshold=0.5,
        eval_report_contact_sheets=2,
    )
    manifest = write_manifest(
        clips.folder,
        [
            {
                "video": "astronaut.mp4",
                "reference_photo": "astronaut_ref.jpg",
                "subject": "astronaut",
                "prompt": "a woman <b>walks</b> & waves",
            },
            {
                "video": "hanks.mp4",
                "reference_photo": "astronaut_ref.jpg",
                "subject": "astronaut",
                "prompt": "talks",
            },
            {"video": "coffee.mp4", "reference_photo": "hanks.png", "subject": "hanks", "prompt": "talks"},
            {"video": "gone.mp4", "reference_photo": "hanks.png", "subject": "hanks", "prompt": "waves"},
        ],
        name="report",
    )
    with Tracker.from_settings(settings) as tracker, Evaluator(settings, tracker=tracker) as evaluator:
        source = collect_source(tracker, manifest=manifest)
        results = [evaluator.evaluate(item) for item in source.items]
        html = render_report(
            results,
            name=source.name,
            source=source.description,
            recognizers=evaluator.models.names,
            gate_recognizer=evaluator.gate_recognizer,
            settings=settings,
            open_video=lambda item: local_copy(item.video, store=None, folder=home),
        )
    path = home / "report.html"
    path.write_text(html, encoding="utf-8")
    return path


def _images(html: str) -> list[Image.Image]:
    sources = re.findall(r'<img src="([^"]+)"', html)
    assert all(src.startswith("data:image/png;base64,") for src in sources)
    return [Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) for src in sources]


def test_report_is_self_contained_and_complete(report):
    html = report.read_text(encoding="utf-8")
    assert "<script" not in html
    assert not re.search(r'(src|href)="(?!data:)', html)  # nothing fetched from anywhere
    assert "<link" not in html and "@import" not in html and "url(" not in html
    for section in ("summary-table", "subject-table", "prompt-table", "video-table", "settings-table"):
        assert f'id="{section}"' in html
    images = _images(html)
    # 3 figures + best and worst contact sheets (2 evaluated videos with frames each side at most).
    assert len(images) == 3 + 3
    assert all(image.format == "PNG" and image.width > 200 and image.height > 100 for image in images)
    assert "a woman &lt;b&gt;walks&lt;/b&gt; &amp; waves" in html  # user text is escaped
    assert "gone.mp4 does not exist" in html
    assert "identity similarity" in html and "below the threshold 0.500" in html
    assert "no face found in any sampled frame" in html
    assert "LYNX_QUALITY_GATE_THRESHOLD" in html and "LYNX_EVAL_RECOGNIZERS" in html


def test_report_renders_in_headless_chromium(report, chromium, tmp_path):
    profile = tmp_path / "profile"
    dom = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", report.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert re.search(r'<h1 id="title">Identity evaluation: report</h1>', dom)
    for table in ("summary-table", "subject-table", "prompt-table", "video-table", "settings-table"):
        assert re.search(rf'<table id="{table}">.*?<tbody>\s*<tr>', dom, re.S), table
    assert len(re.findall(r"<tr", dom.split('id="video-table"')[1].split("</table>")[0])) == 1 + 4
    assert len(re.findall(r'<img src="data:image/png;base64,', dom)) == 6

    # Each image really decodes in the browser: a checker page (test-only, the report has no script)
    # frames the report and writes every <img>'s natural size into its own DOM.
    checker = tmp_path / "check.html"
    checker.write_text(
        f"""<!DOCTYPE html><html><body>
<iframe id="r" src="{report.as_uri()}" width="1200" height="800"></iframe>
<pre id="out">pending</pre><script>
document.getElementById("r").addEventListener("load", () => {{
  const doc = document.getElementById("r").contentDocument;
  const sizes = [...doc.images].map(img => img.complete + ":" + img.naturalWidth + "x" + img.naturalHeight);
  document.getElementById("out").textContent = sizes.join(" ");
}});
</script></body></html>""",
        encoding="utf-8",
    )
    checked = subprocess.run(
        [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            "--allow-file-access-from-files",
            "--virtual-time-budget=10000",
            "--dump-dom",
            checker.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    sizes = re.search(r'<pre id="out">([^<]*)</pre>', checked).group(1).split()
    assert len(sizes) == 6, checked[-2000:]
    for size in sizes:
        complete, dims = size.split(":")
        width, height = map(int, dims.split("x"))
        assert complete == "true" and width > 200 and height > 100, sizes

    screenshot = tmp_path / "report.png"
    subprocess.run(
        [
            chromium,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            "--window-size=1280,2400",
            f"--screenshot={screenshot}",
            report.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    image = Image.open(screenshot).convert("RGB")
    assert image.size == (1280, 2400)
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 500  # text, tables and plots, not a blank page
