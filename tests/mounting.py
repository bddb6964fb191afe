"""Real mounts for integration tests: ``dicomfs mount`` in a subprocess, ``fusermount3 -u`` after.

Every wait has a hard timeout, and teardown never leaves a mount behind (lazy unmount and
SIGKILL as the last resort).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.servers import wait_until

MOUNT_TIMEOUT = 120


def dicomfs(*args: str, env: dict[str, str] | None = None, timeout: float = MOUNT_TIMEOUT,
            check: bool = False) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "dicomfs", *args], capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, **(env or {})}, stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise AssertionError(f"dicomfs {' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return result


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (exists, and is not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def is_mounted(path: Path) -> bool:
    with open("/proc/mounts") as mounts:
        return any(line.split()[1] == str(path) for line in mounts)


class Mount:
    def __init__(self, source: str, mountpoint: Path, cache_dir: Path, *extra: str,
                 env: dict[str, str] | None = None) -> None:
        self.source = source
        self.path = mountpoint
        self.cache_dir = cache_dir
        self.extra = extra
        self.env = env
        self.pid: int | None = None

    @property
    def log(self) -> str:
        try:
            return (self.cache_dir / "dicomfs.log").read_text(errors="replace")
        except OSError:
            return ""

    def start(self) -> Mount:
        self.path.mkdir(parents=True, exist_ok=True)
        result = dicomfs("mount", self.source, str(self.path), "--cache-dir", str(self.cache_dir),
                         "--log-level", "DEBUG", *self.extra, env=self.env)
        if result.returncode != 0:
            raise AssertionError(f"mount failed: {result.stderr}\n--- daemon log ---\n{self.log[-4000:]}")
        assert is_mounted(self.path)
        from dicomfs.mount import pidfile_for

        self.pid = int(pidfile_for(self.path).read_text())
        return self

    def alive(self) -> bool:
        return self.pid is not None and pid_alive(self.pid)

    def stop(self) -> None:
        """Unmount for real; fall back to lazy unmount and SIGKILL so nothing stays behind."""
        if is_mounted(self.path):
            result = subprocess.run(["fusermount3", "-u", str(self.path)], capture_output=True, timeout=30)
            if result.returncode != 0:
                subprocess.run(["fusermount3", "-u", "-z", str(self.path)], capture_output=True, timeout=30)
        try:
            wait_until(lambda: not self.alive(), 30, "the daemon to exit")
        except TimeoutError:
            if self.pid is not None:
                os.kill(self.pid, signal.SIGKILL)
                time.sleep(0.2)
        if is_mounted(self.path):
            subprocess.run(["fusermount3", "-u", "-z", str(self.path)], capture_output=True, timeout=30)

    def kill(self) -> None:
        """SIGKILL the daemon (a crash), then clean up the dead mount."""
        assert self.pid is not None
        os.kill(self.pid, signal.SIGKILL)
        wait_until(lambda: not self.alive(), 30, "the killed daemon to go")
        subprocess.run(["fusermount3", "-u", "-z", str(self.path)], capture_output=True, timeout=30)

    def __enter__(self) -> Mount:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
