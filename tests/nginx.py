"""nginx (the Debian package) serving a static DICOMweb tree with the documented configuration.

The server block is ``docs/nginx/dicomweb.conf`` itself, with only its two example values
replaced: the port (``listen 8080;``) and the mount point (``root /mnt/dicomfs;``). The http-level
wrapper around it keeps pid, logs and temp files in a temp directory and sets what a
distribution's ``http { }`` typically sets (Debian's nginx.conf), plus settings that would break a
FUSE tree (gzip of every type, an open file cache), so the tests prove the server block overrides
them. Every wait has a hard timeout; ``stop()`` always ends nginx and its workers.
"""

from __future__ import annotations

import ctypes
import grp
import http.client
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.servers import _ServerProcess, free_port, wait_until

NGINX = "/usr/sbin/nginx"
DOCUMENTED_CONFIG = Path(__file__).resolve().parent.parent / "docs" / "nginx" / "dicomweb.conf"
DOCUMENTED_VIEWER = DOCUMENTED_CONFIG.parent / "ohif.conf"
NO_VIEWER = "location / {\n        return 404;\n    }"
EXAMPLE_VIEWER_ROOT = "root /var/www/ohif;"
EXAMPLE_LISTEN = "listen 8080;"
EXAMPLE_MOUNT = "/mnt/dicomfs"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
_PR_SET_PDEATHSIG = 1
_prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here, not in the forked child


def _end_with_parent() -> None:
    """In the child, before exec: SIGTERM to nginx if the test process dies without stopping it
    (killed by a timeout, say), so no nginx is left behind holding a port and a mount busy.
    Linux ties it to the starting thread: start and stop from one thread (a ``with`` block does)."""
    _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def worker_user() -> tuple[str, str] | None:
    """The (user, group) nginx workers run as: an unprivileged one when we are root (as a system
    nginx would, so the tests see the permissions a real deployment sees), else ourselves."""
    if os.geteuid() != 0:
        return None
    for name in ("www-data", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        return name, grp.getgrgid(entry.pw_gid).gr_name
    raise RuntimeError("no unprivileged user (www-data, nobody) for the nginx workers")


def documented_server_block(port: int, mount_point: Path, viewer: Path | None = None) -> str:
    """docs/nginx/dicomweb.conf with its port and mount point directives replaced, nothing else;
    with ``viewer``, its ``location /`` replaced by docs/nginx/ohif.conf's, rooted at ``viewer``."""
    for path in (mount_point, viewer):
        if path is not None and any(c.isspace() or c in ";{}'\"$#\\" for c in str(path)):
            raise ValueError(f"{path} cannot go into an nginx config unquoted")
    text = DOCUMENTED_CONFIG.read_text()
    if viewer is not None:
        block = DOCUMENTED_VIEWER.read_text()
        start = re.search(r"^location / \{", block, flags=re.MULTILINE)
        if start is None:
            raise RuntimeError(f"{DOCUMENTED_VIEWER} has no 'location / {{' line: update tests/nginx.py")
        location = block[start.start():].strip().replace(EXAMPLE_VIEWER_ROOT, f"root {viewer};")
        if text.count(NO_VIEWER) != 1 or EXAMPLE_VIEWER_ROOT not in block:
            raise RuntimeError(f"{DOCUMENTED_CONFIG} or {DOCUMENTED_VIEWER} changed shape: update tests/nginx.py")
        text = text.replace(NO_VIEWER, location.replace("\n", "\n    "))
    text, listens = re.subn(rf"^(\s*){re.escape(EXAMPLE_LISTEN)}$", rf"\g<1>listen 127.0.0.1:{port};", text,
                            flags=re.MULTILINE)
    text, roots = re.subn(rf"^(\s*)root {re.escape(EXAMPLE_MOUNT)};$", rf"\g<1>root {mount_point};", text,
                          flags=re.MULTILINE)
    if (listens, roots) != (1, 1):
        raise RuntimeError(f"{DOCUMENTED_CONFIG} no longer has exactly one '{EXAMPLE_LISTEN}' and one "
                           f"'root {EXAMPLE_MOUNT};' directive line: update tests/nginx.py")
    return text


class NginxServer(_ServerProcess):
    """``/usr/sbin/nginx -p <workdir> -c <workdir>/nginx.conf -g 'daemon off;'`` on loopback."""

    def __init__(self, workdir: Path, mount_point: Path, *, port: int | None = None,
                 viewer: Path | None = None) -> None:
        if not os.access(NGINX, os.X_OK):
            raise RuntimeError(f"{NGINX} is not installed: run scripts/install.sh --test (apt package nginx)")
        self.workdir = workdir
        self.mount_point = mount_point
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.error_log = workdir / "error.log"
        self.access_log = workdir / "access.log"
        self.config = workdir / "nginx.conf"
        self.user = worker_user()
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "dicomweb.conf").write_text(documented_server_block(self.port, mount_point, viewer))
        user_line = f"user {self.user[0]} {self.user[1]};" if self.user else ""
        temp_paths = "\n".join(f"    {kind}_temp_path {workdir}/{kind}_temp;"
                               for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        self.config.write_text(f"""\
{user_line}
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {self.error_log} info;
events {{
    worker_connections 64;
}}
http {{
    # What a distribution's http {{ }} sets (Debian's nginx.conf) ...
    include /etc/nginx/mime.types;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    # ... and what would break a FUSE tree if the server block did not override it.
    gzip on;
    gzip_types *;
    gzip_min_length 0;
    open_file_cache max=1000 inactive=60s;
    open_file_cache_errors on;

    access_log {self.access_log};
{temp_paths}
    include {workdir}/dicomweb.conf;
}}
""")

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicomweb"

    def errors(self) -> str:
        try:
            return self.error_log.read_text(errors="replace")[-4000:]
        except OSError:
            return "(no error log)"

    def start(self) -> NginxServer:
        # -e: errors before the config is read go to our log too, not /var/log/nginx/error.log.
        # Its own session, so stop() can end the master and its workers (and nothing else).
        self.process = subprocess.Popen(
            [NGINX, "-p", str(self.workdir), "-c", str(self.config), "-e", str(self.error_log),
             "-g", "daemon off;"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=_end_with_parent)
        try:
            wait_until(self._answers, START_TIMEOUT, f"nginx to answer on port {self.port}")
        except TimeoutError as exc:
            self.stop()
            raise RuntimeError(f"{exc}; nginx error log:\n{self.errors()}") from None
        except BaseException:
            self.stop()
            raise
        return self

    def _answers(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"nginx exited with {self.process.returncode}; error log:\n{self.errors()}")
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
        try:
            connection.request("GET", "/")
            return connection.getresponse().status > 0
        except OSError:
            return False
        finally:
            connection.close()

    def stop(self) -> None:
        """SIGTERM (fast shutdown: the master ends its workers), then SIGKILL to the whole group."""
        process = self.process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                # The master is not reaped yet, so its process group id is still ours.
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait(timeout=STOP_TIMEOUT)
        self.process = None


@contextmanager
def serve_static_tree(mount_point: Path, viewer: Path | None = None) -> Iterator[str]:
    """nginx with the documented config serving ``<mount_point>/dicomweb/`` (and, with ``viewer``,
    that folder at ``/`` as docs/nginx/ohif.conf says); yields the DICOMweb root URL
    (``http://127.0.0.1:<port>/dicomweb``). The tree must be readable by the workers' user
    (``NginxServer.user``; a dicomfs mount needs ``--allow-other`` for that)."""
    workdir = Path(tempfile.mkdtemp(prefix="dicomfs-nginx-"))
    try:
        with NginxServer(workdir, mount_point, viewer=viewer) as server:
            yield server.dicomweb
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
