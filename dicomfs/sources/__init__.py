"""Archive sources. ``open_source`` turns a SOURCE string from the command line into one.

Owns the choice of implementation by URL scheme; each implementation lives in its own module
and implements the protocol in ``base``. Nothing outside this package knows which one is in use.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from dicomfs.errors import UsageError
from dicomfs.sources.base import Credentials, Source, SourceSpec
from dicomfs.transferlimits import DEFAULT_WINDOW as DEFAULT_TIMEOUT

DEFAULT_AE_TITLE = "DICOMFS"
DEFAULT_MOVE_PORT = 11112

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceOptions:
    """Settings some sources need besides their location."""

    endpoint: str | None = None  # object store endpoint (COD); default from the environment
    user_project: str | None = None  # requester-pays project (COD)
    timeout: float = DEFAULT_TIMEOUT  # ``--timeout``: seconds a request may wait for the archive
    ae_title: str = DEFAULT_AE_TITLE  # our calling AE title (DIMSE)
    retrieve: str = "auto"  # get | move | auto (DIMSE)
    move_port: int = DEFAULT_MOVE_PORT  # where our storage SCP listens for C-MOVE (DIMSE)
    max_associations: int = 2  # associations open with the PACS at once (DIMSE)
    tls_ca: str | None = None  # DICOM TLS: the PACS's CA, our certificate and key (dimse+tls)
    tls_cert: str | None = None
    tls_key: str | None = None
    idc_index: str | None = None  # ``--idc-index``: the IDC index parquet (default: idc-index-data's)
    sign: bool = True  # sign S3 requests with the AWS chain's credentials (``--no-sign-request``: never)


def parse_source(text: str) -> SourceSpec:
    """Classify a SOURCE argument without touching the network or the disk."""
    if text == "demo":
        return SourceSpec(kind="demo", location="demo")
    if text == "idc":
        return SourceSpec(kind="idc", location="idc")
    lowered = text.lower()
    for prefix in ("dicomweb+http://", "dicomweb+https://"):
        if lowered.startswith(prefix):
            return _dicomweb_spec(text[len("dicomweb+") :])
    if lowered.startswith(("http://", "https://")):
        return _dicomweb_spec(text)
    if lowered.startswith(("gs://", "s3://")):
        return _bucket_spec(text)
    if lowered.startswith(("cod+https://", "cod+http://")):
        return _cod_url_spec(text[len("cod+"):])
    if lowered.startswith(("dimse://", "dimse+tls://")):
        return _dimse_spec(text)
    if "://" in text:
        scheme = text.split("://", 1)[0]
        raise UsageError(f"unknown source scheme {scheme!r} (use http(s)://, gs://, s3://, cod+https://, dimse://, "
                         "a folder, idc, or demo)")
    if not text:
        raise UsageError("the source is empty (a URL, a folder, idc, or demo)")
    path = Path(text).expanduser()
    try:
        is_folder = path.is_dir()
    except OSError as exc:  # (a folder above it not this user's to enter)
        raise UsageError(f"cannot read the source folder {text}: {exc.strerror}") from None
    if not is_folder:
        raise UsageError(f"source {text!r} is neither a URL, 'idc', 'demo', nor an existing folder")
    return SourceSpec(kind="folder", location=str(path.resolve()))


# A URL already in the form httpx writes it (lower-case scheme and host name, no default port, no
# dot segments, nothing to escape, no query): taken as it is, without loading httpx for it. Hosts
# httpx checks further (IPv4 addresses, IDNA labels) go through httpx.
_PLAIN_URL = re.compile(r"(?P<scheme>https?)://(?P<host>[a-z0-9-]+(?:\.[a-z0-9-]+)*)"
                        r"(?::(?P<port>[1-9][0-9]{0,4}))?(?P<path>(?:/[A-Za-z0-9._~!$&'()*+,;=:@-]*)*)")
_DEFAULT_PORTS = {"http": "80", "https": "443"}


def _dicomweb_spec(url: str) -> SourceSpec:
    """The archive's root URL in one normal form (httpx's), so that one archive always has the
    same location, and so the same default cache folder (``SourceSpec.source_id``)."""
    plain = _PLAIN_URL.fullmatch(url)
    if plain is not None and _plain_as_httpx_writes_it(plain):
        return SourceSpec(kind="dicomweb", location=url.rstrip("/"))
    import httpx

    try:
        parsed = httpx.URL(url)
        host = parsed.host
    except Exception:
        raise UsageError("the DICOMweb URL is not valid") from None
    if parsed.userinfo:
        raise UsageError(
            "put no credentials in the URL: use --user with DICOMFS_PASSWORD, or DICOMFS_TOKEN"
        )
    if not host:
        raise UsageError("the DICOMweb URL has no host")
    return SourceSpec(kind="dicomweb", location=str(parsed).rstrip("/"))


def _plain_as_httpx_writes_it(plain: re.Match[str]) -> bool:
    labels = plain["host"].split(".")
    return (plain["port"] != _DEFAULT_PORTS[plain["scheme"]] and int(plain["port"] or 1) <= 65535
            and not {".", ".."} & set(plain["path"].split("/"))
            and (not all(label.isdigit() for label in labels)  # an IPv4 address: only as httpx writes it
                 or len(labels) == 4 and all(str(int(label)) == label and int(label) <= 255 for label in labels))
            and not any(label.startswith("xn--") for label in labels))  # IDNA: httpx checks it


def _bucket_spec(text: str) -> SourceSpec:
    """``gs://<bucket>/<datastore path>`` or ``s3://…``: the path is used exactly as written."""
    scheme, _, rest = text.partition("://")
    bucket, _, prefix = rest.partition("/")
    _check_bucket(bucket)
    return SourceSpec(kind="cod", location=f"{scheme.lower()}://{bucket}/{prefix.strip('/')}")


def _cod_url_spec(url: str) -> SourceSpec:
    """``https://host/<bucket>/<prefix>``, the COD downloader's string form: ``/dicomweb`` is
    appended to the prefix (``dicomweb`` when there is none); ``?token=`` becomes the token."""
    parts = urlsplit(url)
    if parts.username or parts.password:
        raise UsageError("put no credentials in the URL: use DICOMFS_TOKEN or --token-file")
    bucket, _, prefix = parts.path.strip("/").partition("/")
    _check_bucket(bucket)
    prefix = f"{prefix.strip('/')}/dicomweb" if prefix.strip("/") else "dicomweb"
    token = parse_qs(parts.query).get("token", [None])[0]
    if token:
        log.warning("a token in the source URL is visible in 'ps': prefer DICOMFS_TOKEN or --token-file")
    return SourceSpec(kind="cod", location=f"gs://{bucket}/{prefix}",
                      endpoint=f"{parts.scheme}://{parts.netloc}", token=token)


def _dimse_spec(text: str) -> SourceSpec:
    """``dimse://<called AE title>@<host>:<port>`` (``dimse+tls://`` for DICOM TLS)."""
    scheme, _, rest = text.partition("://")
    ae_title, at, address = rest.rpartition("@")
    host, colon, port = address.rpartition(":")
    host = host.strip("[]")
    if not at or not colon or not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise UsageError(f"a DIMSE source is {scheme.lower()}://<AE title of the PACS>@<host>:<port>, "
                         f"not {text!r}")
    check_ae_title(ae_title, "the PACS's AE title")
    return SourceSpec(kind="dimse", location=f"{scheme.lower()}://{ae_title}@{host}:{int(port)}")


def check_ae_title(title: str, what: str) -> str:
    """An AE title: 1 to 16 characters of ASCII, no backslash or control characters, not all spaces."""
    if not 0 < len(title) <= 16 or not title.strip() or not all(32 <= ord(c) < 127 and c != "\\" for c in title):
        raise UsageError(f"{what} {title!r} is not a valid AE title (1 to 16 ASCII characters, no backslash)")
    return title


def _check_bucket(bucket: str) -> None:
    if not bucket or not all(c.isalnum() or c in "-_." for c in bucket):
        raise UsageError(f"invalid bucket name {bucket!r}")


def open_source(spec: SourceSpec, credentials: Credentials, work_dir: Path,
                options: SourceOptions | None = None) -> Source:
    """Build the source for ``spec``. ``work_dir`` is a private folder inside the cache."""
    options = options or SourceOptions()
    if spec.kind == "cod":
        from dicomfs.sources.cod import CodSource

        scheme, _, rest = spec.location.partition("://")
        name, _, prefix = rest.partition("/")
        if scheme == "s3":
            from dicomfs.sources.s3 import S3Bucket

            return CodSource(S3Bucket(name, endpoint=options.endpoint, sign=options.sign, timeout=options.timeout),
                             prefix)
        from dicomfs.sources.gcs import GcsBucket, default_endpoint

        if spec.token and not credentials.token:
            credentials = Credentials(credentials.user, credentials.password, spec.token)
        endpoint = options.endpoint or spec.endpoint or default_endpoint()
        return CodSource(GcsBucket(endpoint, name, credentials, user_project=options.user_project,
                                   timeout=options.timeout), prefix)
    if spec.kind == "dicomweb":
        from dicomfs.sources.dicomweb import DicomwebSource

        return DicomwebSource(spec.location, credentials, timeout=options.timeout)
    if spec.kind == "dimse":
        from dicomfs.sources.dimse import DimseSource
        from dicomfs.sources.dimse.net import Peer, tls_context

        scheme, _, rest = spec.location.partition("://")
        called, _, address = rest.rpartition("@")
        host, _, port = address.rpartition(":")
        files = (options.tls_ca, options.tls_cert, options.tls_key) if scheme == "dimse+tls" else None
        peer = Peer(host, int(port), called, check_ae_title(options.ae_title, "--ae-title"), options.timeout,
                    tls_context(*files) if files else None, files)
        return DimseSource(peer, retrieve=options.retrieve, move_port=options.move_port,
                           max_associations=options.max_associations)
    if spec.kind == "idc":
        from dicomfs.sources.idc import IdcIndex, IdcSource, default_index

        index = IdcIndex(Path(options.idc_index).expanduser() if options.idc_index else default_index())
        return IdcSource(index, work_dir, endpoint=options.endpoint, sign=False, timeout=options.timeout)
    if spec.kind == "folder":
        from dicomfs.sources.folder import FolderSource

        return FolderSource(Path(spec.location), work_dir)
    if spec.kind == "demo":
        from dicomfs.sources.demo import open_demo_source

        return open_demo_source(work_dir)
    raise UsageError(f"unknown source kind {spec.kind!r}")


def query_keys(spec: SourceSpec) -> dict[str, tuple[str, str, str]]:
    """The keys ``--query`` takes for this source besides DICOM keywords (the IDC index's columns)."""
    if spec.kind == "idc":
        from dicomfs.sources.idc.index import query_keys as idc_keys

        return idc_keys()
    return {}


def credentials_from_environment(user: str | None, password_file: str | None,
                                 token_file: str | None) -> Credentials:
    """Collect credentials from the environment and files, never from argv."""
    password = os.environ.get("DICOMFS_PASSWORD")
    if password_file:
        password = _read_secret(password_file)
    token = os.environ.get("DICOMFS_TOKEN")
    if token_file:
        token = _read_secret(token_file)
    if user and password is None:
        raise UsageError("--user needs a password in DICOMFS_PASSWORD or --password-file")
    return Credentials(user=user, password=password if user else None, token=token or None)


def _read_secret(path: str) -> str:
    try:
        return Path(path).expanduser().read_text().strip()
    except OSError as exc:
        raise UsageError(f"cannot read secret file {path}: {exc.strerror}") from None


__all__ = ["Credentials", "Source", "SourceOptions", "SourceSpec", "credentials_from_environment", "open_source",
           "parse_source", "query_keys"]
