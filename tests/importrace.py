"""Threads that first use a library in a fresh process, all at once: none may get a half-made module.

``assert_imports_whole(setup, jobs, runs)`` starts ``runs`` fresh interpreters; each runs ``setup``
(imports of dicomfs modules, and ``data``: the bytes of pydicom's CT_small.dcm) and then every
expression of ``jobs`` in a thread of its own, the threads released together by a barrier. An
ImportError in any of them fails the test.
"""

from __future__ import annotations

import subprocess
import sys

HARNESS = """
import sys, threading
data = open(sys.argv[1], "rb").read()
{setup}
jobs = [{jobs}]
barrier = threading.Barrier(len(jobs))
errors = []
def run(job):
    barrier.wait()
    try:
        job()
    except ImportError as exc:
        errors.append(repr(exc))
threads = [threading.Thread(target=run, args=(job,)) for job in jobs]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(errors)
"""


def assert_imports_whole(setup: str, jobs: list[str], runs: int) -> None:
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    assert isinstance(path, str)
    script = HARNESS.format(setup=setup, jobs=", ".join(f"lambda: {job}" for job in jobs))
    for _ in range(runs):
        result = subprocess.run([sys.executable, "-c", script, path], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr
