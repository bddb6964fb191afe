"""An emulated network link for a benchmark: a fresh network namespace whose loopback has an
Ethernet MTU and a ``tbf`` qdisc at a given rate.

``ip netns exec`` also gives the command a mount namespace of its own, so the servers, the mounts
and the clients of one run must all be started by the one command run inside (a benchmark module
re-executes itself there: ``reexec``). Needs root, iproute2 and a kernel with ``sch_tbf`` (this
kernel has tbf and htb, not netem: no added delay). The namespace is deleted afterwards, also when
the run fails.
"""

from __future__ import annotations

import os
import subprocess
import sys

INSIDE = "DICOMFS_BENCH_LINK"  # set in the environment of a run that is already on the link
MTU = 1500  # loopback's own is 64 KiB: segments, ACKs and Nagle would not behave as on a real link


def describe(rate: str | None) -> str:
    return f"loopback in a network namespace, MTU {MTU}, tbf {rate}" if rate else "plain loopback"


def run_on_link(rate: str, argv: list[str]) -> int:
    """Run ``argv`` in a new network namespace whose loopback is limited to ``rate`` (tc syntax:
    ``1gbit``, ``200mbit``); its exit status."""
    name = f"dicomfs-bench-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    try:
        for command in (["ip", "link", "set", "lo", "mtu", str(MTU)], ["ip", "link", "set", "lo", "up"],
                        ["tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", rate, "burst", "512kb",
                         "latency", "20ms"]):
            subprocess.run(["ip", "netns", "exec", name, *command], check=True, timeout=30)
        env = {**os.environ, INSIDE: rate}
        return subprocess.run(["ip", "netns", "exec", name, *argv], env=env, check=False).returncode
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False, timeout=30)


def reexec(module: str, rate: str | None) -> int | None:
    """For a benchmark's ``main``: when ``rate`` is asked for and this process is not yet on the
    link, run the same command line there and return its status; None means "go on here"."""
    if not rate or os.environ.get(INSIDE) == rate:
        return None
    return run_on_link(rate, [sys.executable, "-m", module, *sys.argv[1:]])
