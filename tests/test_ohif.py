"""OHIF in a real browser: OHIF 3.13 from npm (scripts/get-ohif.sh) in Debian's Chromium, driven by
Playwright. Once against ``dicomfs serve --viewer``, once against nginx with the documented files
(docs/nginx/dicomweb.conf + ohif.conf + ohif-app-config.js) over a mount: the study list shows the
demo studies, opening one renders an image, and every request the page made was answered 2xx/304."""

from __future__ import annotations

import base64
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest

from tests.mounting import Mount
from tests.nginx import serve_static_tree
from tests.servers import DicomfsServe, require_tools

pytestmark = pytest.mark.mount

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
# --no-sandbox: Chromium's sandbox needs user namespaces a container or root session may lack;
# --enable-unsafe-swiftshader: WebGL (cornerstone renders with it) on the CPU, with no GPU.
CHROMIUM_ARGS = ["--no-sandbox", "--enable-unsafe-swiftshader"]
RENDER_TIMEOUT = 90.0
# Decodes a PNG screenshot in a blank page and counts its colours (no image library needed here).
COUNT_COLOURS = """async (png) => {
  const image = new Image();
  image.src = 'data:image/png;base64,' + png;
  await image.decode();
  const canvas = document.createElement('canvas');
  canvas.width = image.width; canvas.height = image.height;
  const context = canvas.getContext('2d');
  context.drawImage(image, 0, 0);
  const data = context.getImageData(0, 0, canvas.width, canvas.height).data;
  const seen = new Set();
  for (let i = 0; i < data.length; i += 4) seen.add((data[i] << 16) | (data[i + 1] << 8) | data[i + 2]);
  return seen.size;
}"""


@pytest.fixture(scope="session")
def ohif_dist() -> Path:
    """The pinned OHIF build, fetched once (kept in .ohif/ between runs)."""
    require_tools("curl", "tar", "openssl")
    out = subprocess.run(["bash", "scripts/get-ohif.sh"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, check=True).stdout
    return ROOT / out.strip().splitlines()[-1]


@dataclass
class Visit:
    study_list: str = ""
    colours: int = 0
    answers: list[tuple[int, str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def demo_studies(demo_dir: Path) -> dict[str, str]:
    """Study UID -> description of the demo's studies."""
    out: dict[str, str] = {}
    for path in demo_dir.rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        out[str(ds.StudyInstanceUID)] = str(ds.get("StudyDescription", ""))
    return out


def visit(base: str, study_uid: str, wanted_text: list[str]) -> Visit:
    """The study list at ``base``/, then the viewer on ``study_uid``, in headless Chromium."""
    from playwright.sync_api import sync_playwright

    require_tools(CHROMIUM)
    seen = Visit()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=60_000)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.set_default_timeout(60_000)
            page.on("response", lambda r: seen.answers.append((r.status, r.url)))
            page.on("requestfailed", lambda r: seen.failures.append(f"{r.url}: {r.failure}"))
            page.goto(base + "/", wait_until="load")
            for text in wanted_text:
                page.get_by_text(text, exact=True).first.wait_for()
            page.wait_for_load_state("networkidle")
            seen.study_list = page.inner_text("body")
            page.goto(f"{base}/viewer?StudyInstanceUIDs={study_uid}", wait_until="load")
            canvas = page.locator("canvas.cornerstone-canvas").first
            canvas.wait_for()
            scratch = browser.new_page()
            deadline = time.monotonic() + RENDER_TIMEOUT
            while time.monotonic() < deadline:
                png = base64.b64encode(canvas.screenshot()).decode()
                seen.colours = scratch.evaluate(COUNT_COLOURS, png)
                if seen.colours > 64:
                    break
                time.sleep(1)
            page.wait_for_load_state("networkidle")
        finally:
            browser.close()
    return seen


def check(seen: Visit, studies: dict[str, str]) -> None:
    for description in filter(None, studies.values()):
        assert description in seen.study_list, description
    assert seen.colours > 64, f"the viewport stayed (nearly) uniform: {seen.colours} colours"
    bad = [(status, url) for status, url in seen.answers if not (200 <= status < 300 or status == 304)]
    assert not bad, bad[:10]
    assert not seen.failures, seen.failures[:10]
    assert any("/frames/" in url for _, url in seen.answers), "no frame was requested"


def test_ohif_on_dicomfs_serve(ohif_dist: Path, demo_dir: Path, tmp_path: Path) -> None:
    studies = demo_studies(demo_dir)
    study = next(uid for uid, description in studies.items() if description == "dicomfs demo: ct")
    with DicomfsServe("demo", tmp_path / "serve", "--viewer", str(ohif_dist)) as server:
        seen = visit(f"http://127.0.0.1:{server.port}", study, ["dicomfs demo: ct", "dicomfs demo: mr"])
    check(seen, studies)


@pytest.fixture
def public_viewer(ohif_dist: Path) -> Iterator[Path]:
    """OHIF with docs/nginx/ohif-app-config.js, where nginx's workers (www-data) can read it."""
    folder = Path(tempfile.mkdtemp(prefix="dicomfs-ohif-"))
    folder.chmod(0o755)
    viewer = folder / "ohif"
    shutil.copytree(ohif_dist, viewer)
    shutil.copyfile(ROOT / "docs" / "nginx" / "ohif-app-config.js", viewer / "app-config.js")
    for path in [viewer, *viewer.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    yield viewer
    shutil.rmtree(folder, ignore_errors=True)


def test_ohif_on_nginx_over_a_mount(public_viewer: Path, demo_dir: Path,
                                    served_mount: Callable[..., Mount]) -> None:
    studies = demo_studies(demo_dir)
    study = next(uid for uid, description in studies.items() if description == "dicomfs demo: mr")
    mount = served_mount("demo")
    with serve_static_tree(mount.path, viewer=public_viewer) as root:
        seen = visit(root.removesuffix("/dicomweb"), study, ["dicomfs demo: ct", "dicomfs demo: mr"])
    check(seen, studies)
