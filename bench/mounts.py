"""The three FUSE mounts the benchmark compares, each a subprocess with a hard-timeout teardown.

* ``DicomfsMount``: ``python -m dicomfs mount`` (detached daemon; its pid from the pid file).
* ``RcloneMount``: ``rclone mount`` of an Orthanc WebDAV tree, ``--vfs-cache-mode full``.
* ``PassthroughMount``: ``python -m bench.passthrough`` over a local folder.

``stop()`` never leaves a mount behind: ``fusermount3 -u``, then ``-u -z``, then SIGKILL of the
process we started (by its pid, never by name).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.servers import wait_until

ROOT = Path(__file__).resolve().parents[1]
MOUNT_TIMEOUT = 120.0
STOP_TIMEOUT = 30.0


def run_timed(argv: list[str], *, capture: bool = False, timeout: float = 600.0,
              cwd: Path | None = None, env: dict[str, str] | None = None) -> tuple[float, int, str]:
    """Run a command; return (wall seconds, exit status, its stdout if ``capture``).

    ``subprocess.run(timeout=...)`` polls for the child's exit with sleeps of up to 50 ms, which
    would swamp a 50 ms measurement; here the parent blocks in ``waitpid`` and a watchdog thread
    kills the child after ``timeout`` seconds instead.
    """
    started = time.perf_counter()
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, cwd=cwd,
                               env={**os.environ, **env} if env else None,
                               stdout=subprocess.PIPE if capture else subprocess.DEVNULL)
    watchdog = threading.Timer(timeout, process.kill)
    watchdog.start()
    try:
        out = process.stdout.read() if process.stdout is not None else b""
        status = process.wait()
    except BaseException:
        process.kill()
        process.wait()
        raise
    finally:
        watchdog.cancel()
        if process.stdout is not None:
            process.stdout.close()
    return time.perf_counter() - started, status, out.decode(errors="replace")


def stop_on_sigterm() -> None:
    """Make SIGTERM raise KeyboardInterrupt in the main thread, as Ctrl-C does, so that a run
    stops everything it started (its ``ExitStack``s and ``finally`` blocks) either way."""
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def is_mounted(path: Path) -> bool:
    with open("/proc/mounts") as mounts:
        return any(line.split()[1] == str(path) for line in mounts)


def unmount(path: Path) -> None:
    """``fusermount3 -u``, falling back to a lazy unmount."""
    if not is_mounted(path):
        return
    result = subprocess.run(["fusermount3", "-u", str(path)], capture_output=True, timeout=STOP_TIMEOUT,
                            check=False)
    if result.returncode != 0 or is_mounted(path):
        subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True, timeout=STOP_TIMEOUT,
                       check=False)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in KiB (empty if it is gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                name, _, value = line.partition(":")
                if name in ("VmRSS", "VmHWM"):
                    out[name] = int(value.split()[0])
    except OSError:
        pass
    return out


def cpu_seconds(pid: int | None) -> float:
    """user + system CPU time of a process so far (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except (OSError, TypeError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Mount:
    """What the three kinds of mount share: ``start()`` returns seconds to mount; ``stop()``."""

    path: Path
    pid: int | None = None
    process: subprocess.Popen[bytes] | None = None

    log_file: Path

    def start(self) -> float:
        raise NotImplementedError

    def _spawn(self, argv: list[str], what: str) -> float:
        """Start a mounting process that stays in the foreground; seconds until it is mounted."""
        started = time.perf_counter()
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, cwd=ROOT)
        self.pid = self.process.pid
        wait_until(lambda: self._ready(what), MOUNT_TIMEOUT, f"{what} to mount", interval=0.005)
        return time.perf_counter() - started

    def _ready(self, what: str) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"{what} exited with {self.process.returncode} (log: {self.log_file})")
        return is_mounted(self.path)

    def stop(self) -> None:
        unmount(self.path)
        if self.process is not None:
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_TIMEOUT)
        elif self.pid is not None:
            pid = self.pid  # narrowed for the lambda
            try:
                wait_until(lambda: not alive(pid), STOP_TIMEOUT, "the daemon to exit")
            except TimeoutError:
                os.kill(pid, signal.SIGKILL)
                time.sleep(0.2)
        unmount(self.path)  # a killed daemon leaves a dead mount


class DicomfsMount(Mount):
    def __init__(self, source: str, path: Path, cache_dir: Path, log_file: Path,
                 env: dict[str, str] | None = None, args: tuple[str, ...] = ()) -> None:
        self.source = source
        self.args = args  # more options for ``dicomfs mount``
        self.path = path
        self.cache_dir = cache_dir
        self.log_file = log_file
        self.env = env  # added to the daemon's environment (e.g. STORAGE_EMULATOR_HOST)

    def start(self) -> float:
        """Mount; returns how long ``dicomfs mount`` took to return (the daemon is ready then)."""
        self.path.mkdir(parents=True, exist_ok=True)
        elapsed, status, _ = run_timed(
            [sys.executable, "-m", "dicomfs", "mount", self.source, str(self.path), "--cache-dir",
             str(self.cache_dir), "--log-level", "INFO", "--log-file", str(self.log_file), *self.args],
            timeout=MOUNT_TIMEOUT, cwd=ROOT, env=self.env)
        if status != 0 or not is_mounted(self.path):
            raise RuntimeError(f"dicomfs mount failed with status {status} (log: {self.log_file})")
        from dicomfs.mount import pidfile_for

        self.pid = int(pidfile_for(self.path).read_text())
        return elapsed


class RcloneMount(Mount):
    def __init__(self, webdav_url: str, path: Path, cache_dir: Path, log_file: Path) -> None:
        self.url = webdav_url
        self.path = path
        self.cache_dir = cache_dir
        self.log_file = log_file

    def start(self) -> float:
        self.path.mkdir(parents=True, exist_ok=True)
        config = self.cache_dir.parent / "rclone.conf"
        config.touch()
        argv = ["rclone", "mount", f":webdav,url='{self.url}':", str(self.path), "--read-only",
                "--vfs-cache-mode", "full", "--cache-dir", str(self.cache_dir), "--config", str(config)]
        return self._spawn(argv, "rclone mount")


class PassthroughMount(Mount):
    def __init__(self, source: Path, path: Path, log_file: Path) -> None:
        self.source = source
        self.path = path
        self.log_file = log_file

    def start(self) -> float:
        self.path.mkdir(parents=True, exist_ok=True)
        return self._spawn([sys.executable, "-m", "bench.passthrough", str(self.source), str(self.path)],
                           "the passthrough")
