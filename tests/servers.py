"""Real servers on loopback for integration tests and benchmarks: Orthanc, a counting proxy.

Every wait has a hard timeout. Nothing here is a mock: Orthanc is the Debian package, the proxy
forwards real HTTP to it byte for byte (and counts what passes).
"""

from __future__ import annotations

import http.client
import io
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
import zipfile
from collections import Counter
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self

ORTHANC = "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def connections_to(port: int) -> int:
    """Established TCP connections (from anywhere on this machine) to local ``port``: the
    associations a DICOM server has open."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "01" and int(fields[2].rsplit(":", 1)[1], 16) == port:  # ESTABLISHED, to port
                count += 1
    return count


class _OnLoopback:
    """A server on 127.0.0.1:``port``; ``dicomweb`` is where Orthanc's DICOMweb root would be."""

    port: int
    scheme = "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"


class _ServerProcess(_OnLoopback):
    """A server we run as a subprocess: ``start()`` it (or ``with``), ``stop()`` always ends it."""

    process: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident memory so far (VmHWM), in MiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def wait_until(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class OrthancServer(_ServerProcess):
    """``/usr/sbin/Orthanc`` with its own storage and ports, as the spec prescribes."""

    def __init__(self, workdir: Path, *, port: int | None = None, users: dict[str, str] | None = None,
                 modalities: dict[str, dict[str, object]] | None = None, verbose: bool = False,
                 extra: dict[str, object] | None = None) -> None:
        """``modalities``: Orthanc's DicomModalities; with them, only those AE titles may use its
        DIMSE services (unknown ones are turned away at association time). ``verbose`` logs every
        DIMSE request (``requests`` counts them). ``extra``: more configuration."""
        if not (os.path.exists(ORTHANC) and os.path.exists(DICOMWEB_PLUGIN)):
            raise RuntimeError("Orthanc is not installed: run scripts/install.sh (apt packages orthanc, "
                               "orthanc-dicomweb)")
        self.workdir = workdir
        self.port = port or free_port()
        self.users = users
        self.verbose = verbose
        self.process: subprocess.Popen[bytes] | None = None
        self.dicom_port = free_port()
        self.aet = "ORTHANC"
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / "orthanc.json"
        config: dict[str, object] = {
            "Name": "dicomfs-test", "StorageDirectory": str(workdir / "db"),
            "IndexDirectory": str(workdir / "db"), "HttpPort": self.port, "DicomPort": self.dicom_port,
            "DicomAet": self.aet, "RemoteAccessAllowed": False, "AuthenticationEnabled": bool(users),
            "Plugins": [DICOMWEB_PLUGIN], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "HttpThreadsCount": 8,
        }
        if users:
            config["RegisteredUsers"] = users
        if modalities is not None:
            config.update({"DicomModalities": modalities, "DicomAlwaysAllowEcho": False,
                           "DicomAlwaysAllowFind": False, "DicomAlwaysAllowGet": False,
                           "DicomAlwaysAllowMove": False, "DicomAlwaysAllowStore": False,
                           "DicomCheckCalledAet": True})
        config.update(extra or {})
        self.config.write_text(json.dumps(config))

    def start(self) -> OrthancServer:
        log = open(self.workdir / "orthanc.log", "ab")
        self.process = subprocess.Popen([ORTHANC, *(["--verbose"] if self.verbose else []), str(self.config)],
                                        stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        log.close()
        wait_until(self._answers, 30, "Orthanc to answer /system")
        return self

    def _answers(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {self.process.returncode}: see {self.workdir}/orthanc.log")
        try:
            with urllib.request.urlopen(self._request("/system"), timeout=2) as response:
                status: int = response.status
                return status == 200
        except OSError:
            return False

    def _request(self, path: str, data: bytes | None = None) -> urllib.request.Request:
        request = urllib.request.Request(self.url + path, data=data, method="POST" if data is not None else "GET")
        if self.users:
            import base64

            user, password = next(iter(self.users.items()))
            request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
        return request


    def upload(self, files: list[Path] | list[bytes]) -> None:
        """Store files; more than a few go up as one zip (Orthanc unpacks it)."""
        blobs = [f.read_bytes() if isinstance(f, Path) else f for f in files]
        if len(blobs) <= 3:
            for blob in blobs:
                self._post("/instances", blob)
            return
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
            for number, blob in enumerate(blobs):
                archive.writestr(f"{number}.dcm", blob)
        self._post("/instances", buffer.getvalue())

    def _post(self, path: str, body: bytes) -> None:
        with urllib.request.urlopen(self._request(path, body), timeout=300) as response:
            answer = json.loads(response.read() or b"null")
        items = answer if isinstance(answer, list) else [answer]
        stored = ("Success", "AlreadyStored")
        bad = [item for item in items if isinstance(item, dict) and item.get("Status") not in stored]
        if bad:
            raise RuntimeError(f"Orthanc refused uploads: {bad[:3]}")

    def delete_instance(self, sop_instance_uid: str) -> None:
        """Remove one instance from the archive (found by its UID)."""
        with urllib.request.urlopen(self._request("/tools/lookup", sop_instance_uid.encode()), timeout=30) as response:
            found = [item["ID"] for item in json.loads(response.read()) if item.get("Type") == "Instance"]
        if len(found) != 1:
            raise RuntimeError(f"Orthanc has {len(found)} instances {sop_instance_uid}")
        request = self._request(f"/instances/{found[0]}")
        request.method = "DELETE"
        with urllib.request.urlopen(request, timeout=30):
            pass

    def requests(self, kind: str) -> int:
        """How many DIMSE requests of ``kind`` (``Get``, ``Move``, ``Find``) Orthanc received, by
        its log (``verbose`` only)."""
        text = (self.workdir / "orthanc.log").read_text(errors="replace")
        return text.count(f"Incoming {kind} request from AET")

    @property
    def dimse(self) -> str:
        """The DIMSE source of this Orthanc: ``dimse://<AE title>@127.0.0.1:<DICOM port>``."""
        return f"dimse://{self.aet}@127.0.0.1:{self.dicom_port}"

    def statistics(self) -> dict[str, Any]:
        with urllib.request.urlopen(self._request("/statistics"), timeout=10) as response:
            statistics: dict[str, Any] = json.loads(response.read())
            return statistics




HOP_BY_HOP = ("transfer-encoding", "connection", "keep-alive")


def ask_upstream(handler: BaseHTTPRequestHandler, port: int,
                 timeout: float = 60) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """Send the GET that ``handler`` received on to ``127.0.0.1:port``, as it came; the caller
    closes the connection. Raises OSError if the server cannot be reached."""
    upstream = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    headers = {k: v for k, v in handler.headers.items() if k.lower() not in ("host", "connection")}
    try:
        upstream.request("GET", handler.path, headers=headers)
        return upstream, upstream.getresponse()
    except OSError:
        upstream.close()
        raise


def pass_headers(handler: BaseHTTPRequestHandler, response: http.client.HTTPResponse,
                 leave_out: tuple[str, ...] = ()) -> None:
    """The upstream answer's status and headers, but hop-by-hop ones (and ``leave_out``)."""
    handler.send_response(response.status)
    for name, value in response.getheaders():
        if name.lower() not in HOP_BY_HOP + leave_out:
            handler.send_header(name, value)


class CountingProxy(_OnLoopback):
    """A transparent HTTP proxy in front of one server that counts requests by kind.

    ``kind(path)`` classifies: "qido" for searches, "wado-series" for series retrieves,
    "wado-other" for any other retrieve. ``fail_next`` lets a test answer the next N requests
    with an error status, ``fail_when(path)`` every request it picks.
    """

    def __init__(self, upstream_port: int, classify: Callable[[str], str] | None = None) -> None:
        self.upstream_port = upstream_port
        self.classify = classify or self.kind
        self.counts: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()  # response body bytes per kind
        self.paths: list[str] = []
        self.fail_next = 0
        self.fail_when: Callable[[str], bool] | None = None
        self.fail_status = 500
        self.throttle = 0.0  # seconds to sleep after each 64 KiB forwarded
        self.delay = 0.0  # seconds to wait before asking upstream (a long round trip)
        self.active: Counter[str] = Counter()  # requests being answered, by kind
        self.most_at_once: Counter[str] = Counter()  # the most of a kind answered at once
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                with proxy.lock:
                    kind = proxy.classify(self.path)
                    proxy.counts[kind] += 1
                    proxy.paths.append(self.path)
                    failing = proxy.fail_next > 0
                    if failing:
                        proxy.fail_next -= 1
                    elif proxy.fail_when is not None and proxy.fail_when(self.path):
                        failing = True
                    proxy.active[kind] += 1
                    proxy.most_at_once[kind] = max(proxy.most_at_once[kind], proxy.active[kind])
                try:
                    self.answer(kind, failing)
                finally:
                    with proxy.lock:
                        proxy.active[kind] -= 1

            def answer(self, kind: str, failing: bool) -> None:
                if failing:
                    self.send_response(proxy.fail_status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                time.sleep(proxy.delay)
                try:
                    upstream, response = ask_upstream(self, proxy.upstream_port)
                except OSError:
                    self.send_response(502)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                pass_headers(self, response)
                self.end_headers()
                try:
                    while chunk := response.read(65536):
                        self.wfile.write(chunk)
                        with proxy.lock:
                            proxy.bytes[kind] += len(chunk)
                        if proxy.throttle:
                            time.sleep(proxy.throttle)
                except OSError:
                    pass
                finally:
                    upstream.close()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @staticmethod
    def kind(path: str) -> str:
        route = path.split("?")[0].rstrip("/")
        parts = route.split("/")
        if "studies" not in parts:
            return "other"
        tail = parts[parts.index("studies"):]
        if tail[-1] in ("studies", "series", "instances"):
            return "qido"
        if len(tail) == 4 and tail[2] == "series":
            return "wado-series"
        return "wado-other"

    def __enter__(self) -> CountingProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class _ManyAtOnce(ThreadingHTTPServer):
    """A listen backlog for many clients connecting at once (socketserver's default, 5, drops the
    rest's SYNs: they come a second later)."""

    request_queue_size = 128


# what an AnsweringServer's ``answer`` is: (path, headers) -> (status, headers, body)
Answer = Callable[[str, dict[str, str]], tuple[int, dict[str, str], bytes | Iterable[bytes]]]


class AnsweringServer(_OnLoopback):
    """A loopback HTTP server whose GETs ``answer(path, headers)`` decides: (status, headers,
    body), the body bytes or an iterable of pieces, sent as they come (HTTP/1.0: the end of the
    body is the end of the connection unless a Content-Length is given). For unit tests of an
    HTTP client that needs a real socket; ``tls``: HTTPS with that server context."""

    def __init__(self, answer: Answer, *, tls: ssl.SSLContext | None = None) -> None:
        self.requests: list[tuple[str, dict[str, str]]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                headers = {k.lower(): v for k, v in self.headers.items()}
                server.requests.append((self.path, headers))
                status, extra, body = answer(self.path, headers)
                self.send_response(status)
                for name, value in extra.items():
                    self.send_header(name, value)
                self.end_headers()
                try:
                    for piece in [body] if isinstance(body, bytes) else body:
                        self.wfile.write(piece)
                        self.wfile.flush()
                except OSError:
                    pass

        self.server = _ManyAtOnce(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.scheme = "https" if tls is not None else "http"
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> AnsweringServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def require_tools(*names: str) -> None:
    missing = [name for name in names if shutil.which(name) is None]
    if missing:
        raise RuntimeError(f"missing tools {missing}: run scripts/install.sh")


def classify_gcs(path: str) -> str:
    """What a request to the GCS JSON API is for: a tar, a metadata.json, a listing, other."""
    if ".tar" in path:
        return "tar"
    if "metadata.json" in path:
        return "metadata"
    return "list" if "/o?" in path else "other"


class GcsEmulator(_ServerProcess):
    """``gcp-storage-emulator`` (PyPI) on loopback, in memory, with one bucket."""

    def __init__(self, bucket: str = "cod-test") -> None:
        self.bucket = bucket
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return self.url

    def start(self) -> GcsEmulator:
        import sys

        executable = Path(sys.executable).parent / "gcp-storage-emulator"
        if not executable.exists():
            raise RuntimeError("gcp-storage-emulator is not installed: run scripts/install.sh --test")
        self.process = subprocess.Popen(
            [str(executable), "start", "--host", "127.0.0.1", "--port", str(self.port), "--in-memory",
             "--default-bucket", self.bucket, "--quiet"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self._answers, 30, "the GCS emulator to answer")
        return self

    def _answers(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"the GCS emulator exited with {self.process.returncode}")
        try:
            with urllib.request.urlopen(f"{self.endpoint}/storage/v1/b/{self.bucket}", timeout=2) as response:
                status: int = response.status
                return status == 200
        except OSError:
            return False

    def upload(self, objects: dict[str, bytes]) -> None:
        from urllib.parse import quote

        for name, data in objects.items():
            url = f"{self.endpoint}/upload/storage/v1/b/{self.bucket}/o?uploadType=media&name={quote(name, safe='')}"
            request = urllib.request.Request(url, data=data, method="POST",
                                             headers={"Content-Type": "application/octet-stream"})
            with urllib.request.urlopen(request, timeout=60) as response:
                assert response.status == 200, name





class S3Server(_ServerProcess):
    """``moto_server`` (PyPI moto, server mode) on loopback: a real S3 API (ListObjectsV2 pages,
    Range, SigV4), in memory. With ``enforce_auth`` it checks every request's SigV4 signature
    against an IAM user it creates at start (``access_key``, ``secret_key``) and refuses others;
    without, anyone may read (a public bucket). Its buckets are made with ``create_bucket``."""

    REGION = "us-east-1"

    def __init__(self, *, enforce_auth: bool = False) -> None:
        self.enforce_auth = enforce_auth
        self.port = free_port()
        self.access_key, self.secret_key = "dicomfs-test-key", "dicomfs-test-secret"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return self.url

    def start(self) -> S3Server:
        import sys

        executable = Path(sys.executable).parent / "moto_server"
        if not executable.exists():
            raise RuntimeError("moto_server is not installed: run scripts/install.sh --test")
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        if self.enforce_auth:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "3"  # the three IAM calls below, then SigV4 only
        self.process = subprocess.Popen([str(executable), "-H", "127.0.0.1", "-p", str(self.port)], env=env,
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        wait_until(self._answers, 60, "the S3 server (moto) to answer")
        if self.enforce_auth:
            iam = self._client("iam", "bootstrap", "bootstrap")
            iam.create_user(UserName="dicomfs")
            key = iam.create_access_key(UserName="dicomfs")["AccessKey"]
            iam.put_user_policy(UserName="dicomfs", PolicyName="all", PolicyDocument=json.dumps(
                {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
            self.access_key, self.secret_key = key["AccessKeyId"], key["SecretAccessKey"]
        return self

    def _answers(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"moto_server exited with {self.process.returncode}")
        try:
            with urllib.request.urlopen(f"{self.url}/moto-api/", timeout=2) as response:
                status: int = response.status
                return status == 200
        except OSError:
            return False

    def _client(self, service: str, key: str | None = None, secret: str | None = None) -> Any:  # a boto3 client
        import boto3
        from botocore.config import Config

        return boto3.client(service, endpoint_url=self.endpoint, region_name=self.REGION,
                            aws_access_key_id=key or self.access_key, aws_secret_access_key=secret or self.secret_key,
                            config=Config(retries={"max_attempts": 1}))

    def create_bucket(self, name: str, *, public: bool = False) -> S3BucketHandle:
        """A bucket; ``public``: it and the objects put into it are readable by anyone (the
        ``public-read`` canned ACL)."""
        self._client("s3").create_bucket(Bucket=name, **({"ACL": "public-read"} if public else {}))
        return S3BucketHandle(self, name, public)

    def env(self, *, signed: bool = True) -> dict[str, str]:
        """The environment a dicomfs process needs to reach this server (with its credentials)."""
        env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_REGION": self.REGION, "AWS_EC2_METADATA_DISABLED": "true",
               "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}
        if signed:
            env.update(AWS_ACCESS_KEY_ID=self.access_key, AWS_SECRET_ACCESS_KEY=self.secret_key)
        return env


class S3BucketHandle:
    """One bucket of an ``S3Server``: ``upload`` objects into it (as ``GcsEmulator.upload`` does)."""

    def __init__(self, server: S3Server, name: str, public: bool) -> None:
        self.server = server
        self.name = name
        self.public = public
        self.port = server.port

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    def upload(self, objects: dict[str, bytes]) -> None:
        client = self.server._client("s3")
        for key, data in objects.items():
            client.put_object(Bucket=self.name, Key=key, Body=data, **({"ACL": "public-read"} if self.public else {}))


class DicomfsServe(_ServerProcess):
    """``dicomfs serve SOURCE`` on a free loopback port, ready when it prints its root URL."""

    def __init__(self, source: str, workdir: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.source = source
        self.workdir = workdir
        self.extra = extra
        self.env = env
        self.port = free_port()
        self.log_path = workdir / "serve.log"

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}/dicomweb"

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> Self:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self.process = process = subprocess.Popen(
                [sys.executable, "-m", "dicomfs", "serve", self.source, "--port", str(self.port), "--cache-dir",
                 str(self.workdir / "cache"), *self.extra], stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, **(self.env or {})})
        try:
            wait_until(lambda: f"serving {self.source} at" in self.log or process.poll() is not None, 60,
                       "dicomfs serve to listen")
        except TimeoutError:
            self.stop()
            raise
        if self.process.poll() is not None:
            raise RuntimeError(f"dicomfs serve exited with {self.process.returncode}: {self.log[-2000:]}")
        return self
