"""The shipped systemd unit: it parses, and its command lines do what systemd would make them do
(clear a stale mount, start, report READY=1, stop on SIGTERM, clean up)."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.fsutil import p10_hashes, sh
from tests.mounting import Mount, is_mounted
from tests.servers import free_port, require_tools, wait_until

pytestmark = pytest.mark.mount  # real servers, processes or mounts (see conftest)

UNIT = Path(__file__).parent.parent / "systemd" / "dicomfs@.service"
DICOMFS = "/usr/local/bin/dicomfs"


def unit_commands(key: str, unit: Path = UNIT) -> list[str]:
    return [line.split("=", 1)[1] for line in unit.read_text().splitlines() if line.startswith(key + "=")]


def verify(unit: Path, tmp_path: Path) -> None:
    """``systemd-analyze verify`` of ``unit``, its dicomfs command pointing at this checkout."""
    require_tools("systemd-analyze")
    wrapper = tmp_path / "dicomfs"
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} -m dicomfs \"$@\"\n")
    wrapper.chmod(0o755)
    copy = tmp_path / unit.name.replace("@", "@test")
    copy.write_text(unit.read_text().replace(DICOMFS, str(wrapper)))
    result = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def expand(command: str, env: dict[str, str]) -> tuple[bool, list[str]]:
    """systemd's rules: ``${X}`` is one word, ``$X`` splits on white space; ``-`` ignores failure."""
    ignore = command.startswith("-")
    words: list[str] = []
    for word in shlex.split(command.lstrip("-")):
        if re.fullmatch(r"\$\{\w+\}", word):
            words.append(env[word[2:-1]])
        elif re.fullmatch(r"\$\w+", word):
            words.extend(env[word[1:]].split())
        else:
            words.append(word)
    if words[0] == DICOMFS:
        words[:1] = [sys.executable, "-m", "dicomfs"]
    return ignore, words


def test_unit_file_verifies(tmp_path: Path) -> None:
    verify(UNIT, tmp_path)
    assert "Type=notify" in UNIT.read_text() and "--systemd" in unit_commands("ExecStart")[0]
    assert unit_commands("UMask") == ["0077"]  # the cache holds patient names


def test_unit_commands_clear_stale_mounts_start_and_stop(tmp_path: Path) -> None:
    require_tools("fusermount3")
    env = {"SOURCE": "demo", "MOUNTPOINT": str(tmp_path / "mnt"),
           "DICOMFS_OPTIONS": f"--cache-dir {tmp_path / 'cache'} --listing-ttl 30"}
    # A previous daemon was killed: its mount point is now a dead mount.
    crashed = Mount("demo", tmp_path / "mnt", tmp_path / "old-cache").start()
    os.kill(crashed.pid, signal.SIGKILL)  # type: ignore[arg-type]
    wait_until(lambda: not crashed.alive(), 30, "the old daemon to die")
    assert is_mounted(tmp_path / "mnt")

    for command in unit_commands("ExecStartPre"):
        ignore, words = expand(command, env)
        result = subprocess.run(words, capture_output=True, timeout=60)
        assert ignore or result.returncode == 0, result.stderr
    assert not is_mounted(tmp_path / "mnt")

    notify_path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(notify_path)
        notify.settimeout(120)
        _, words = expand(unit_commands("ExecStart")[0], env)
        daemon = subprocess.Popen(words, env={**os.environ, "NOTIFY_SOCKET": notify_path},
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert notify.recv(100) == b"READY=1"
            assert len(p10_hashes(tmp_path / "mnt")) == 54
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(timeout=60) == 0
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait(timeout=30)
    for command in unit_commands("ExecStopPost"):
        ignore, words = expand(command, env)
        assert subprocess.run(words, capture_output=True, timeout=60).returncode == 0 or ignore
    mounted_after = is_mounted(tmp_path / "mnt")
    if mounted_after:
        sh("fusermount3", "-u", "-z", str(tmp_path / "mnt"), check=False)
    assert not mounted_after


SERVE_UNIT = UNIT.parent / "dicomfs-serve@.service"


def test_serve_unit_verifies_starts_answers_and_stops(tmp_path: Path) -> None:
    """dicomfs-serve@.service: it parses, READY=1 comes once it listens, it answers DICOMweb, and
    SIGTERM ends it with status 0."""
    verify(SERVE_UNIT, tmp_path)
    [start] = unit_commands("ExecStart", SERVE_UNIT)
    port = free_port()
    env = {"SOURCE": "demo", "DICOMFS_OPTIONS": f"--cache-dir {tmp_path / 'cache'} --port {port}"}
    _, words = expand(start, env)
    notify_path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(notify_path)
        notify.settimeout(120)
        daemon = subprocess.Popen(words, env={**os.environ, "NOTIFY_SOCKET": notify_path},
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            assert notify.recv(100) == b"READY=1"
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/dicomweb/studies", timeout=60) as answer:
                assert answer.status == 200 and len(json.loads(answer.read())) == 9
            daemon.send_signal(signal.SIGTERM)
            assert notify.recv(100) == b"STOPPING=1"
            assert daemon.wait(timeout=60) == 0
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait(timeout=30)
