"""The README's first command, as a newcomer runs it: install, mount the demo, show it."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fsutil import sh
from tests.mounting import dicomfs, is_mounted

pytestmark = pytest.mark.mount  # real servers, processes or mounts (see conftest)

ROOT = Path(__file__).parent.parent


def test_demo_script_mounts_the_demo(tmp_path: Path) -> None:
    assert "bash scripts/demo.sh" in (ROOT / "README.md").read_text()
    mountpoint = tmp_path / "dicom-demo"
    try:
        result = sh("bash", str(ROOT / "scripts" / "demo.sh"), str(mountpoint), timeout=900,
                    env={"XDG_CACHE_HOME": str(tmp_path / "xdg-cache")})
        assert is_mounted(mountpoint)
        assert "54 instance files" in result.stdout
        pydicom_line = result.stdout.split("read with pydicom:\n")[1].splitlines()[0]
        assert " x " in pydicom_line and "Endian" in pydicom_line  # PatientName, syntax, Rows x Columns
        assert "dicomweb/studies/index.json.gz lists 9 studies" in result.stdout
        assert list((tmp_path / "xdg-cache" / "dicomfs").iterdir())  # the default cache location
    finally:
        if is_mounted(mountpoint):
            assert dicomfs("umount", str(mountpoint)).returncode == 0
    assert not is_mounted(mountpoint)


def test_ci_runs_the_readme_test_command() -> None:
    assert "bash scripts/test.sh" in (ROOT / "README.md").read_text()
    assert "exec bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
