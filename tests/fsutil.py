"""Filesystem access for integration tests, always in a subprocess with a hard timeout,
so that a misbehaving mount fails the test instead of hanging it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TIMEOUT = 180


def sh(*command: str, timeout: float = TIMEOUT, check: bool = True, cwd: Path | None = None,
       env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout, cwd=cwd,
                            stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"{command} failed ({result.returncode}): {result.stderr[-2000:]}")
    return result


def hashes(root: Path, timeout: float = TIMEOUT) -> dict[str, str]:
    """relative path -> sha256 of every regular file below root (read through the mount)."""
    out = sh("find", str(root), "-type", "f", "-exec", "sha256sum", "{}", "+", timeout=timeout).stdout
    result = {}
    for line in out.splitlines():
        digest, path = line.split(maxsplit=1)
        result[str(Path(path).relative_to(root))] = digest
    return result


def p10_hashes(mount_root: Path, timeout: float = TIMEOUT) -> dict[str, str]:
    """``studies/…`` path -> sha256 of every instance file of a mount (not its ``dicomweb/``)."""
    return {f"studies/{k}": v for k, v in hashes(mount_root / "studies", timeout).items()}


def read_errno(path: Path, timeout: float = 120) -> int:
    """0 if the whole file reads, else the errno the read failed with."""
    code = ("import sys\ntry:\n    open(sys.argv[1], 'rb').read()\nexcept OSError as e:\n"
            "    print(e.errno)\n    raise SystemExit(0)\nprint(0)\n")
    return int(sh(sys.executable, "-c", code, str(path), timeout=timeout).stdout.strip())


def stat_errno(path: Path, timeout: float = 60) -> int:
    code = ("import os, sys\ntry:\n    os.stat(sys.argv[1])\nexcept OSError as e:\n"
            "    print(e.errno)\n    raise SystemExit(0)\nprint(0)\n")
    return int(sh(sys.executable, "-c", code, str(path), timeout=timeout).stdout.strip())


def listdir(path: Path, timeout: float = 120) -> list[str]:
    return sorted(sh("ls", "-A", str(path), timeout=timeout).stdout.split())
