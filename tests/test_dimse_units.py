"""The DIMSE source's pure parts: C-FIND identifiers and answers, presentation contexts, the
Part 10 wrapper (checked by pydicom and dcmtk's dcmftest), the source string, and what the daemon
and its retrieve workers say to each other through a real pipe; and how its failures reach the
caller, against PACS of our own (pynetdicom SCPs in the test's process, on loopback): a C-FIND
unanswered, cancelled, or without a context; a C-GET that times out, or is refused."""

from __future__ import annotations

import io
import logging
import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from dicomfs.errors import ProtocolError, UsageError
from dicomfs.p10check import Part10Check
from dicomfs.query import parse_query
from dicomfs.records import SeriesRecord
from dicomfs.sources import parse_source
from dicomfs.sources.dimse import contexts, part10, pipe, query
from dicomfs.sources.dimse.net import Peer
from tests.importrace import assert_imports_whole

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"


def test_identifiers_ask_for_the_return_keys_of_their_level() -> None:
    study = query.identifier("STUDY")
    assert study.QueryRetrieveLevel == "STUDY"
    for keyword in ("PatientName", "StudyDate", "ModalitiesInStudy", "NumberOfStudyRelatedInstances"):
        assert keyword in study and not study[keyword].value  # universal matching
    assert "SpecificCharacterSet" not in study
    image = query.identifier("IMAGE", {"StudyInstanceUID": "1.2", "SeriesInstanceUID": "1.2.3"})
    assert "SOPClassUID" in image and not image.SOPClassUID
    assert image.SeriesInstanceUID == "1.2.3" and "NumberOfFrames" in image


def test_query_terms_go_to_c_find_as_it_matches_natively() -> None:
    terms = parse_query(["PatientName=MÜLLER*", "StudyDate=20240101-20240131", "AccessionNumber=A?12",
                         "StudyInstanceUID=1.2.3,1.2.4", "Modality=CT", "NumberOfStudyRelatedSeries=3",
                         "StudyDate=2024*", "StudyDescription=*"]).terms
    matching = query.study_matching(terms)
    assert matching == {"PatientName": "MÜLLER*", "StudyDate": "20240101-20240131", "AccessionNumber": "A?12",
                        "StudyInstanceUID": "1.2.3\\1.2.4", "ModalitiesInStudy": "CT"}
    ds = query.identifier("STUDY", matching)
    assert ds.SpecificCharacterSet == "ISO_IR 192"  # a value that is not ASCII goes as UTF-8
    assert ds.StudyInstanceUID == ["1.2.3", "1.2.4"]  # a UID list
    encoded = DicomBytesIO()
    encoded.is_little_endian, encoded.is_implicit_VR = True, True  # as pynetdicom encodes it
    write_dataset(encoded, ds)
    assert "MÜLLER".encode() in encoded.getvalue()
    assert "SpecificCharacterSet" not in query.identifier("STUDY", {"PatientName": "DOE^J*"})


def answer(**values: object) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def test_answers_with_bad_duplicate_missing_or_foreign_keys_are_dropped(caplog: pytest.LogCaptureFixture) -> None:
    studies = query.studies([
        answer(StudyInstanceUID="1.2.3", PatientName="Doe^John", QueryRetrieveLevel="STUDY"),
        answer(StudyInstanceUID="1.2.3", PatientName="again"),  # a duplicate
        answer(StudyInstanceUID="../../etc"), answer(PatientName="no key"), answer(StudyInstanceUID="9" * 70),
        answer(StudyInstanceUID="1.2.4", SpecificCharacterSet="ISO_IR 192", PatientName="Müller^Hans"),
    ])
    assert [s.uid for s in studies] == ["1.2.3", "1.2.4"]
    assert studies[0].attrs["00100010"]["Value"] == [{"Alphabetic": "Doe^John"}]
    assert studies[1].attrs["00100010"]["Value"] == [{"Alphabetic": "Müller^Hans"}]
    assert "00080052" not in studies[0].attrs  # the question's level is not an attribute
    series = query.series("1.2.3", [answer(SeriesInstanceUID="1.2.3.1", StudyInstanceUID="1.2.3"),
                                    answer(SeriesInstanceUID="1.2.9.1", StudyInstanceUID="1.2.9")])
    assert [s.uid for s in series] == ["1.2.3.1"]
    found = query.instances(SeriesRecord("1.2.3", "1.2.3.1"), [
        answer(SOPInstanceUID="1.2.3.1.1", SOPClassUID="1.2.840.10008.5.1.4.1.1.7", SeriesInstanceUID="1.2.3.1"),
        answer(SOPInstanceUID="1.2.3.1.2", SeriesInstanceUID="1.2.3.2"), answer(SOPInstanceUID="")])
    assert [i.key for i in found] == ["1.2.3.1.1"]
    log = caplog.text
    assert "without a valid StudyInstanceUID" in log and "answered 1.2.9.1 under 1.2.9" in log


def test_one_context_per_sop_class_and_transfer_syntax_within_the_limit() -> None:
    ct, mr = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"
    pairs = contexts.storage_pairs([ct])
    assert pairs == [(ct, ts) for ts in contexts.TRANSFER_SYNTAXES]  # every syntax for one class
    assert len(contexts.storage_pairs([ct, mr, ct])) == 2 * len(contexts.TRANSFER_SYNTAXES)
    many = [f"1.2.3.{n}" for n in range(20)]
    pairs = contexts.storage_pairs(many)
    assert len(pairs) <= 127 and {c for c, _ in pairs} == set(many)  # all classes, fewer syntaxes
    assert {ts for _, ts in pairs} == set(contexts.TRANSFER_SYNTAXES[:127 // 20])
    cxs, roles = contexts.retrieve_contexts(query.STUDY_ROOT_GET, [ct, mr])
    assert cxs[0].abstract_syntax == query.STUDY_ROOT_GET and len(cxs) == 1 + 2 * len(contexts.TRANSFER_SYNTAXES)
    assert all(len(cx.transfer_syntax) == 1 for cx in cxs[1:])  # one syntax each: no transcoding
    assert sorted(r.sop_class_uid for r in roles) == sorted([ct, mr]) and all(r.scp_role for r in roles)


@pytest.mark.mount  # runs dcmdump
@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_bigendian.dcm", "JPEG2000.dcm", "image_dfl.dcm",
                                  "SC_rgb_rle_2frame.dcm", "MR_small_implicit.dcm"])
def test_the_part10_wrapper_makes_files_pydicom_and_dcmtk_read(name: str, tmp_path: Path) -> None:
    original = pydicom.dcmread(TEST_FILES / name)
    raw = (TEST_FILES / name).read_bytes()
    from dicomfs.p10 import parse_file_meta

    dataset = raw[parse_file_meta(raw).end:]  # the data set as a C-STORE carries it
    syntax = str(original.file_meta.TransferSyntaxUID)
    head = part10.header(str(original.SOPClassUID), str(original.SOPInstanceUID), syntax, "ORTHANC")
    path = tmp_path / name
    path.write_bytes(head + dataset)
    check = Part10Check()
    check.feed(path.read_bytes())
    check.finish()  # the walk of the whole file ends exactly at its end
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == syntax
    assert ds.file_meta.MediaStorageSOPInstanceUID == original.SOPInstanceUID
    assert ds.file_meta.ImplementationClassUID == part10.IMPLEMENTATION_CLASS_UID
    assert ds.file_meta.ImplementationVersionName is not None
    assert ds.file_meta.ImplementationVersionName.startswith("DICOMFS_")
    assert ds.file_meta.SourceApplicationEntityTitle == "ORTHANC"
    assert all(ds[e.tag].value == e.value for e in original)  # every element, pixel data included
    result = subprocess.run(["dcmftest", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "yes" in result.stdout, result.stdout + result.stderr
    dump = subprocess.run(["dcmdump", "-q", str(path)], capture_output=True, text=True, timeout=60)
    assert dump.returncode == 0 and "MediaStorageSOPInstanceUID" in dump.stdout


def test_dimse_source_strings() -> None:
    assert parse_source("dimse://PACS_AE@pacs.example.org:104").location == "dimse://PACS_AE@pacs.example.org:104"
    assert parse_source("DIMSE+TLS://A@10.0.0.1:2762").location == "dimse+tls://A@10.0.0.1:2762"
    assert parse_source("dimse://ORTHANC@[::1]:4242").location == "dimse://ORTHANC@::1:4242"
    for bad in ("dimse://pacs.example.org:104", "dimse://AE@host", "dimse://AE@host:0", "dimse://@host:104",
                "dimse://WAY-TOO-LONG-AE-TITLE@host:104", "dimse://A\\B@host:104"):
        with pytest.raises(UsageError):
            parse_source(bad)


def _frames(events: list[pipe.Event]) -> list[tuple[str, object]]:
    """Events as comparable tuples, consecutive instance data joined."""
    out: list[tuple[str, object]] = []
    for event in events:
        if isinstance(event, pipe.InstanceData):
            if out and out[-1][0] == "data":
                out[-1] = ("data", out[-1][1] + bytes(event.data))  # type: ignore[operator]
            else:
                out.append(("data", bytes(event.data)))
        elif isinstance(event, pipe.Message):
            out.append((event.kind.decode(), event.body))
        elif isinstance(event, pipe.InstanceStart):
            out.append(("start", (event.key, event.size)))
        elif isinstance(event, pipe.Progress):
            out.append(("progress", event.received))
        else:
            out.append(("end", None))
    return out


def test_worker_frames_arrive_whole_however_the_pipe_cuts_them() -> None:
    import os
    import threading

    read_fd, write_fd = os.pipe()

    def work() -> None:  # (more than a pipe holds: written while read)
        writer = pipe.FrameWriter(write_fd)
        writer.progress(12345)
        writer.instance("1.2.3.4", b"HEAD", b"x" * 70_000)
        writer.message(pipe.LOG, {"level": 30, "message": "série 1.2: dropped"})
        writer.instance("1.2.3.5", b"", b"")
        writer.message(pipe.DONE, {})
        os.close(write_fd)

    thread = threading.Thread(target=work)
    thread.start()
    stream = b""
    while chunk := os.read(read_fd, 1 << 16):
        stream += chunk
    os.close(read_fd)
    thread.join(timeout=30)
    expected = [("progress", 12345), ("start", ("1.2.3.4", 70_004)), ("data", b"HEAD" + b"x" * 70_000), ("end", None),
                ("L", {"level": 30, "message": "série 1.2: dropped"}), ("start", ("1.2.3.5", 0)), ("end", None),
                ("D", {})]
    for size in (1, 2, 7, 4096, len(stream)):
        reader = pipe.FrameReader()
        events = [event for start in range(0, len(stream), size) for event in reader.feed(stream[start:start + size])]
        assert _frames(events) == expected, size
        assert reader.idle
    reader = pipe.FrameReader()
    list(reader.feed(stream[:30]))
    assert not reader.idle  # cut inside an instance: the stream may not end here
    with pytest.raises(ProtocolError, match="unknown frame"):
        list(pipe.FrameReader().feed(b"Zjunk"))


def test_a_worker_request_carries_the_peer_and_rebuilds_its_tls(tmp_path: Path) -> None:
    peer = Peer("pacs.example.org", 11112, "PACS", "DICOMFS", 12.0)
    back, fields = pipe.read_request(pipe.request(peer, "1.2", "1.2.3", {"1.2.3.4": "1.2.840.10008.5.1.4.1.1.7"}, 20))
    assert back == peer and back.tls is None
    assert fields == {"study": "1.2", "series": "1.2.3", "listed": {"1.2.3.4": "1.2.840.10008.5.1.4.1.1.7"},
                      "log_level": 20, "move_port": None}  # a C-GET
    assert pipe.read_request(pipe.request(peer, "1.2", "1.2.3", {}, 20, 11113))[1]["move_port"] == 11113  # a C-MOVE
    with pytest.raises(UsageError, match="cannot use the TLS files"):
        pipe.read_request(pipe.request(Peer("h", 1, "A", "B", 1.0, tls_files=(str(tmp_path / "no-ca.pem"), None,
                                                                            None)), "1", "2", {}, 20))


async def test_callers_at_the_same_time_share_one_image_level_c_find(monkeypatch: pytest.MonkeyPatch) -> None:
    """A prefetch lists a series (the catalog) and starts its retrieve (which needs the listing's
    SOP classes) at once: one IMAGE-level C-FIND serves both; a later listing asks again."""
    import trio

    from dicomfs.sources.dimse import DimseSource

    source = DimseSource(Peer("pacs.example.org", 11112, "PACS", "DICOMFS", 5.0))
    asked: list[str] = []

    async def find(identifier: Dataset, what: str) -> list[Dataset]:
        asked.append(identifier.QueryRetrieveLevel)
        await trio.sleep(0.05)
        answer = Dataset()
        answer.StudyInstanceUID, answer.SeriesInstanceUID = "1.2", "1.2.3"
        answer.SOPInstanceUID, answer.SOPClassUID = "1.2.3.4", "1.2.840.10008.5.1.4.1.1.7"
        return [answer]

    async def warm(count: int = 1) -> None:
        pass

    monkeypatch.setattr(source, "_find", find)
    monkeypatch.setattr(source.workers, "warm", warm)
    series = SeriesRecord("1.2", "1.2.3")
    found: list[list[str]] = []

    async def listing() -> None:
        found.append([i.key for i in await source.list_instances(series)])

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(listing)
    assert asked == ["IMAGE"] and found == [["1.2.3.4"]] * 3
    assert source._listed[series.key] == {"1.2.3.4": "1.2.840.10008.5.1.4.1.1.7"}
    await source.list_instances(series)
    assert asked == ["IMAGE", "IMAGE"]


def _listener(port: int) -> socket.socket:
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind(("", port))
    holder.listen()
    return holder


def test_a_move_port_held_elsewhere_is_waited_for_then_one_line(caplog: pytest.LogCaptureFixture) -> None:
    """The Storage SCP of a C-MOVE listens only while its move runs; a port another process holds
    (another dicomfs moving from the same PACS) is waited for, up to the timeout, and then refused
    with one line that says what to change."""
    import threading

    from dicomfs.errors import SourceError
    from dicomfs.sources.dimse import net
    from tests.servers import free_port

    port = free_port()
    holder = _listener(port)
    threading.Timer(0.3, holder.close).start()  # the other process's move ends
    with caplog.at_level(logging.INFO, logger="dicomfs"):
        scp = net.storage_scp(Peer("127.0.0.1", 104, "PACS", "DICOMFS", 5.0), port, [])
    try:
        assert f"port {port} for C-MOVE is in use" in caplog.text
        with pytest.raises(OSError):
            _listener(port).close()  # ours now
    finally:
        scp.shutdown()
    _listener(port).close()  # and free again once it is shut down
    holder = _listener(port)
    try:
        with pytest.raises(SourceError, match=rf"cannot listen on port {port} for C-MOVE: .*--move-port"):
            net.storage_scp(Peer("127.0.0.1", 104, "PACS", "DICOMFS", 0.3), port, [])
    finally:
        holder.close()


def test_the_move_storage_scp_takes_the_pacs_ae_title_alone() -> None:
    """Only the PACS (its AE title, as the source names it) may open an association to the Storage
    SCP a C-MOVE listens with; any other calling AE title is rejected."""
    from pynetdicom import AE

    from dicomfs.sources.dimse import net
    from tests.servers import free_port

    port = free_port()
    scp = net.storage_scp(Peer("127.0.0.1", 104, "PACS", "DICOMFS", 5.0), port, [])
    try:
        for calling, accepted in (("INTRUDER", False), ("PACS", True)):
            ae = AE(ae_title=calling)
            ae.add_requested_context("1.2.840.10008.5.1.4.1.1.7")  # secondary capture storage
            assoc = ae.associate("127.0.0.1", port, ae_title="DICOMFS")
            assert assoc.is_established == accepted and assoc.is_rejected != accepted, calling
            if assoc.is_established:
                assoc.release()
    finally:
        scp.shutdown()


def test_moved_instances_from_anyone_but_the_pacs_are_refused(caplog: pytest.LogCaptureFixture) -> None:
    """On a C-MOVE's Storage SCP, an association from another address than the PACS's gets its
    instances refused (and not counted as the retrieve's progress); the PACS's are delivered."""
    from types import SimpleNamespace

    from dicomfs.sources.dimse import retrieve

    delivered: list[str] = []

    def deliver(key: str, head: bytes, data: bytes) -> bool:
        delivered.append(key)
        return True

    job = retrieve.Job("dimse://PACS@10.0.0.5:104", "PACS", "1.2", "1.2.3", {"1.2.3.4": "1.2.840.10008.5.1.4.1.1.7"},
                       deliver)
    data_set = b"\x08\x00\x18\x00UI\x08\x001.2.3.4\x00"

    def event(address: str) -> SimpleNamespace:
        request = SimpleNamespace(AffectedSOPInstanceUID="1.2.3.4", AffectedSOPClassUID="1.2.840.10008.5.1.4.1.1.7",
                                  DataSet=SimpleNamespace(getvalue=lambda: data_set))
        return SimpleNamespace(assoc=SimpleNamespace(requestor=SimpleNamespace(address=address)), request=request,
                               context=SimpleNamespace(transfer_syntax="1.2.840.10008.1.2.1"), data=b"x" * 100)

    pacs = {"10.0.0.5"}
    assert retrieve.store_moved(job, pacs, event("10.6.6.6")) == retrieve.STORE_REFUSED
    retrieve.count_moved(job, pacs, event("10.6.6.6"))
    assert delivered == [] and job.received == 0 and "refused instance '1.2.3.4' from 10.6.6.6" in caplog.text
    assert retrieve.store_moved(job, pacs, event("10.0.0.5")) == 0x0000
    retrieve.count_moved(job, pacs, event("10.0.0.5"))
    assert delivered == ["1.2.3.4"] and job.received == 100


# --- failures against a PACS of our own: pynetdicom SCPs in this process, on loopback -----------
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
WAIT = 30.0  # the longest an SCP's handler holds its answer back (the test releases it sooner)


@contextmanager
def scp(supported: list[str], handlers: list[Any], *, storage_scu: bool = False,
        timeout: float = 5.0) -> Iterator[Peer]:
    """A PACS called ``PACS`` on a free loopback port that supports ``supported`` (and sends
    instances by C-GET with ``storage_scu``); the peer that reaches it with ``timeout``."""
    from pynetdicom import AE

    ae = AE(ae_title="PACS")
    for syntax in supported:
        ae.add_supported_context(syntax)
    if storage_scu:
        ae.add_supported_context(SECONDARY_CAPTURE, scu_role=True, scp_role=True)
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
    assert server is not None
    try:
        yield Peer("127.0.0.1", server.server_address[1], "PACS", "DICOMFS", timeout)
    finally:
        server.shutdown()


def _study(uid: str) -> Dataset:
    return answer(QueryRetrieveLevel="STUDY", StudyInstanceUID=uid)


async def test_a_c_find_left_unanswered_is_an_outage_the_catalog_rides_out(tmp_path: Path) -> None:
    """The association opens, the C-FIND is never answered: the caller gets one SourceUnavailable
    (not a group of them), so the breaker opens and the catalog serves its stored listing."""
    import threading

    import trio
    from pynetdicom import evt

    from dicomfs.breaker import is_outage
    from dicomfs.catalog import Catalog
    from dicomfs.errors import SourceUnavailable
    from dicomfs.sources.dimse import VERIFICATION, DimseSource

    hanging, release = threading.Event(), threading.Event()

    def on_find(event: Any) -> Iterator[tuple[int, Dataset | None]]:
        if hanging.is_set():
            release.wait(WAIT)
        else:
            yield 0xFF00, _study("1.2.3.4")
        yield 0x0000, None

    with trio.fail_after(60), scp([VERIFICATION, query.STUDY_ROOT_FIND], [(evt.EVT_C_FIND, on_find)],
                                  timeout=1.0) as peer:
        source = DimseSource(peer)
        catalog = Catalog(source, tmp_path / "store", listing_ttl=0.0)  # every listing asks the PACS
        try:
            assert list(await catalog.studies()) == ["1.2.3.4"]
            hanging.set()
            with pytest.raises(SourceUnavailable, match="did not answer about the studies") as caught:
                await source.list_studies()
            assert is_outage(caught.value)
            assert list(await catalog.studies()) == ["1.2.3.4"]  # the stored listing
        finally:
            release.set()
            catalog.close()
            await source.aclose()


def test_a_pacs_without_study_root_find_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A PACS that does Verification and Patient Root C-FIND but not Study Root: ``dicomfs ls``
    says so in one line (no ValueError from pynetdicom, in a group or not), and so does a query."""
    import trio

    from dicomfs import cli
    from dicomfs.sources.dimse import VERIFICATION, DimseSource

    with scp([VERIFICATION, PATIENT_ROOT_FIND], []) as peer:
        assert cli.main(["ls", peer.description, "--cache-dir", str(tmp_path / "cache")]) == 1
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1 and "for Study Root C-FIND (no common presentation context)" in lines[0], lines

        async def listing() -> None:
            source = DimseSource(peer)
            try:
                with trio.fail_after(30), pytest.raises(ProtocolError, match="no common presentation context"):
                    await source.list_studies()
            finally:
                await source.aclose()

        trio.run(listing)


async def test_a_c_find_given_up_is_cancelled_and_its_sharers_ask_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """The caller of an IMAGE-level C-FIND gives up: the PACS is sent a C-CANCEL, the caller's
    cancellation goes on (not a SourceError about status 0xFE00), and a caller that was sharing
    that C-FIND asks again instead of failing."""
    import threading
    import time

    import trio
    import trio.testing
    from pynetdicom import evt

    from dicomfs.sources.dimse import VERIFICATION, DimseSource

    started, cancelled = threading.Event(), threading.Event()
    finds: list[int] = []

    def instance() -> Dataset:
        return answer(QueryRetrieveLevel="IMAGE", StudyInstanceUID="1.2", SeriesInstanceUID="1.2.3",
                      SOPInstanceUID="1.2.3.4", SOPClassUID=SECONDARY_CAPTURE)

    def on_find(event: Any) -> Iterator[tuple[int, Dataset | None]]:
        finds.append(event.message_id)
        yield 0xFF00, instance()
        if len(finds) == 1:  # the first is held until cancelled
            started.set()
            deadline = time.monotonic() + WAIT
            while not cancelled.is_set() and time.monotonic() < deadline:
                if event.is_cancelled:  # (true once: pynetdicom forgets the C-CANCEL it reports)
                    cancelled.set()
                else:
                    time.sleep(0.01)
            if cancelled.is_set():
                yield 0xFE00, None
                return
        yield 0x0000, None

    async def warm(count: int = 1) -> None:
        pass

    with trio.fail_after(60), scp([VERIFICATION, query.STUDY_ROOT_FIND], [(evt.EVT_C_FIND, on_find)]) as peer:
        source = DimseSource(peer)
        monkeypatch.setattr(source.workers, "warm", warm)
        series = SeriesRecord("1.2", "1.2.3")
        leader = trio.CancelScope()
        outcome: dict[str, object] = {}

        async def first() -> None:
            with leader:
                await source.list_instances(series)
                outcome["first"] = "answered"
            outcome["first cancelled"] = leader.cancelled_caught

        async def second() -> None:
            outcome["second"] = [i.key for i in await source.list_instances(series)]

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(first)
                await trio.to_thread.run_sync(started.wait, WAIT)
                nursery.start_soon(second)
                await trio.testing.wait_all_tasks_blocked()  # the second waits on the first's C-FIND
                leader.cancel()
        finally:
            await source.aclose()
    assert outcome == {"first cancelled": True, "second": ["1.2.3.4"]}
    assert cancelled.is_set() and len(finds) == 2  # the PACS saw the C-CANCEL; the second asked again


class _Sink:
    """A series sink that keeps what arrives."""

    def __init__(self) -> None:
        self.instances: dict[str, bytes] = {}

    def in_thread(self) -> Any:
        raise AssertionError("the DIMSE source delivers on the event loop")

    def arrived(self, size: int) -> None:
        pass

    def wants(self, key: str) -> bool:
        return True

    def awaited(self) -> list[str]:
        return []

    async def begin(self, key: str, size: int | None) -> Any:
        sink = self

        class Writer:
            data = b""

            async def write(self, data: bytes | bytearray | memoryview) -> None:
                self.data += bytes(data)

            async def finish(self) -> None:
                sink.instances[key] = self.data

        return Writer()


def _pacs_with_get(on_get: Any, timeout: float = 5.0, instances: int = 1) -> Any:
    """A PACS that lists series 1.2/1.2.3 (``instances`` secondary captures, 1.2.3.4 and on) and
    answers C-GET with ``on_get``."""
    from pynetdicom import evt

    from dicomfs.sources.dimse import VERIFICATION

    def on_find(event: Any) -> Iterator[tuple[int, Dataset | None]]:
        for n in range(4, 4 + instances):
            yield 0xFF00, answer(QueryRetrieveLevel="IMAGE", StudyInstanceUID="1.2", SeriesInstanceUID="1.2.3",
                                 SOPInstanceUID=f"1.2.3.{n}", SOPClassUID=SECONDARY_CAPTURE)
        yield 0x0000, None

    return scp([VERIFICATION, query.STUDY_ROOT_FIND, query.STUDY_ROOT_GET],
               [(evt.EVT_C_FIND, on_find), (evt.EVT_C_GET, on_get)], storage_scu=True, timeout=timeout)


def _instance(sop: str = "1.2.3.4") -> Dataset:
    from tests.factory import make_instance

    return pydicom.dcmread(io.BytesIO(make_instance("1.2", "1.2.3", sop)))


@pytest.mark.mount  # retrieves run in worker processes
@pytest.mark.parametrize("ending", ["silence", "abort"])
async def test_a_c_get_broken_off_midway_says_who_ended_it(ending: str) -> None:
    """A PACS that sends one instance of two and then falls silent past --timeout, or aborts the
    association: the retrieve broke off, after 1 instance, and the one line says which of the two
    happened (and, for the first, which option to raise)."""
    import threading

    import trio

    from dicomfs.errors import TransferBroken
    from dicomfs.sources.dimse import DimseSource

    release = threading.Event()

    def on_get(event: Any) -> Iterator[Any]:
        yield 2
        yield 0xFF00, _instance("1.2.3.4")
        if ending == "abort":
            event.assoc.abort()
            return
        release.wait(WAIT)
        yield 0xFF00, _instance("1.2.3.5")
        yield 0x0000, None

    expected = {"silence": r"\(the PACS sent nothing more within --timeout 1 s\)",
                "abort": r"\(the PACS ended the association\)"}[ending]
    with trio.fail_after(60), _pacs_with_get(on_get, timeout=1.0, instances=2) as peer:
        source = DimseSource(peer)
        sink = _Sink()
        try:
            with pytest.raises(TransferBroken, match=r"the C-GET of series 1\.2\.3 broke off after 1 instances "
                                                     + expected):
                await source.fetch_series(SeriesRecord("1.2", "1.2.3"), sink)
            assert list(sink.instances) == ["1.2.3.4"]
        finally:
            release.set()
            await source.aclose()


@pytest.mark.mount  # retrieves run in worker processes
async def test_a_c_get_slow_to_start_is_a_timeout_not_a_refusal(caplog: pytest.LogCaptureFixture) -> None:
    """A PACS that sends nothing within --timeout of a C-GET (near-line storage, a busy PACS):
    pynetdicom aborts the association, and that is a timeout that names the option, not a
    refusal: ``--retrieve auto`` stays with C-GET, and the next C-GET brings the series."""
    import threading

    import trio

    from dicomfs.errors import SourceUnavailable
    from dicomfs.sources.dimse import DimseSource

    release = threading.Event()
    gets: list[int] = []

    def on_get(event: Any) -> Iterator[Any]:
        gets.append(event.message_id)
        if len(gets) == 1:
            release.wait(WAIT)  # the first C-GET: nothing for longer than the timeout
        yield 1
        yield 0xFF00, _instance()
        yield 0x0000, None

    with trio.fail_after(60), _pacs_with_get(on_get, timeout=1.0) as peer:
        source = DimseSource(peer)
        series = SeriesRecord("1.2", "1.2.3")
        try:
            with pytest.raises(SourceUnavailable, match=r"did not answer the C-GET of series 1\.2\.3 within "
                                                        r"--timeout 1 s") as caught:
                await source.fetch_series(series, _Sink())
            assert type(caught.value) is SourceUnavailable  # an outage, not a GetRefused
            release.set()
            sink = _Sink()
            await source.fetch_series(series, sink)
            assert list(sink.instances) == ["1.2.3.4"] and len(gets) == 2  # by C-GET again
            assert not source._use_move and "C-MOVE" not in caplog.text
        finally:
            release.set()
            await source.aclose()


@pytest.mark.mount  # retrieves run in worker processes
@pytest.mark.parametrize("refusal", ["status", "abort"])
async def test_a_c_get_refused_switches_to_c_move_saying_so_once(refusal: str, caplog: pytest.LogCaptureFixture,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A PACS that refuses C-GET, by a refusal status (0xA702) or by aborting the association as
    Orthanc does: ``--retrieve auto`` moves this series and the next ones by C-MOVE, and says so
    once."""
    import trio

    from dicomfs.sources.dimse import DimseSource

    gets: list[int] = []

    def on_get(event: Any) -> Iterator[Any]:
        gets.append(event.message_id)
        if refusal == "abort":
            event.assoc.abort()
            return
        yield 1
        yield 0xA702, None

    with trio.fail_after(60), _pacs_with_get(on_get) as peer:
        source = DimseSource(peer)
        moved: list[str] = []

        async def move(series: SeriesRecord, listed: dict[str, str], sink: Any) -> None:
            moved.append(series.uid)

        monkeypatch.setattr(source, "_move", move)
        series = SeriesRecord("1.2", "1.2.3")
        try:
            await source.fetch_series(series, _Sink())
            await source.fetch_series(series, _Sink())
        finally:
            await source.aclose()
    assert len(gets) == 1 and moved == ["1.2.3", "1.2.3"] and source._use_move
    assert caplog.text.count("using C-MOVE to dicomfs's storage SCP") == 1


def test_refusals_name_what_the_pacs_must_be_told() -> None:
    """An association rejected for our calling AE title names it and the address the PACS sees;
    an unknown C-MOVE destination (0xA801) names the AE title, address and port to register."""
    from pynetdicom import build_context

    from dicomfs.errors import AccessRefused
    from dicomfs.sources.dimse import net, status
    from tests.servers import free_port

    port = free_port()
    scp = net.storage_scp(Peer("127.0.0.1", 104, "OTHER", "X", 5.0), port, [])  # accepts the AE title OTHER alone
    try:
        with pytest.raises(AccessRefused) as refused:
            net.open_association(Peer("127.0.0.1", port, "ANY", "DICOMFS", 5.0),
                                 [build_context("1.2.840.10008.5.1.4.1.1.7")])
    finally:
        scp.shutdown()
    line = str(refused.value)
    assert "'DICOMFS'" in line and "127.0.0.1" in line and "\n" not in line, line
    moved = status.failure("dimse://PACS@pacs:104", "C-MOVE", "series 1.2", 0xA801,
                           "AE title 'DICOMFS' at 10.1.2.3 port 11112")
    assert "AE title 'DICOMFS' at 10.1.2.3 port 11112" in str(moved) and "0xA801" in str(moved)


async def test_a_pacs_that_does_not_answer_a_release_holds_neither_the_pool_nor_its_end() -> None:
    """An idle query association whose release the PACS never answers: the pool's end waits for
    it ``RELEASES_AWAITED`` seconds, not pynetdicom's ACSE timeout and then its abort's (20 s each
    here; a hard 10 s limit fails the test), and a retrieve that needs its place does not get it
    while the release is under way (the PACS may still count that association)."""
    import threading

    import trio
    from pynetdicom import evt

    from dicomfs.sources.dimse import VERIFICATION
    from dicomfs.sources.dimse.net import AssociationPool

    silent = threading.Event()
    answered = threading.Event()

    def on_pdu(event: Any) -> None:
        if type(event.pdu).__name__ == "A_RELEASE_RQ" and silent.is_set():
            answered.wait(60)  # the PACS's reactor stops here: no A-RELEASE-RP

    with scp([VERIFICATION, query.STUDY_ROOT_FIND], [(evt.EVT_PDU_RECV, on_pdu)], timeout=20.0) as peer:
        pool = AssociationPool(peer, 1, [query.STUDY_ROOT_FIND, VERIFICATION])
        try:
            async with pool.query() as assoc:
                assert assoc.is_established
            silent.set()
            with trio.fail_after(10):
                with trio.move_on_after(1) as waited:  # the only place is held until the release is over
                    async with pool.room():
                        pass
                assert waited.cancelled_caught
                await pool.aclose()
        finally:
            answered.set()


@pytest.mark.mount  # (a process: the command's)
def test_ctrl_c_while_a_pacs_says_nothing_ends_the_command(tmp_path: Path) -> None:
    """``dicomfs ls`` of a PACS that accepts the connection and never answers the association
    request: Ctrl-C ends it at once. (pynetdicom's own threads, which are not daemons, wait for
    four times ``--timeout`` (240 s here); the command's process no longer waits for them.)"""
    import signal
    import sys
    import time

    from tests.servers import wait_until

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes the connections; nobody reads them
        port = silent.getsockname()[1]
        # (-X faulthandler: should it not end, SIGABRT makes it print where each thread is)
        command = subprocess.Popen([sys.executable, "-X", "faulthandler", "-m", "dicomfs", "ls",
                                    f"dimse://PACS@127.0.0.1:{port}", "--timeout", "60", "--cache-dir",
                                    str(tmp_path / "cache")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   # as from a terminal: a suite run as a background job has SIGINT
                                   # ignored, and a child keeps that (Python then installs no handler)
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            wait_until(lambda: list((tmp_path / "cache").glob("*")), 30,
                       "the command to be under way (its cache folder exists)")
            time.sleep(1)
            command.send_signal(signal.SIGINT)
            try:
                status = command.wait(timeout=30)
            except subprocess.TimeoutExpired:
                command.send_signal(signal.SIGABRT)
                _, stderr = command.communicate(timeout=30)
                raise AssertionError("Ctrl-C did not end the command in 30 s; where its threads were:\n"
                                     + stderr.decode(errors="replace")[-6000:]) from None
            assert status == 130, command.stderr.read().decode(errors="replace") if command.stderr else ""
        finally:
            if command.poll() is None:
                command.kill()
                command.wait(timeout=30)


async def test_an_opening_left_by_its_caller_keeps_its_place_until_it_is_over() -> None:
    """A query cancelled while its association is still being opened (a PACS that accepts the
    connection and says nothing) returns at once, but the opening goes on in its thread: its
    place is not handed to anyone until it is over (the PACS may count it), then it is."""
    import trio

    from dicomfs.sources.dimse import VERIFICATION
    from dicomfs.sources.dimse.net import AssociationPool

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # the kernel completes the connection; nobody answers
    peer = Peer("127.0.0.1", silent.getsockname()[1], "PACS", "DICOMFS", 20.0)
    pool = AssociationPool(peer, 1, [query.STUDY_ROOT_FIND, VERIFICATION])
    try:
        with trio.fail_after(30):
            with trio.move_on_after(0.5) as opening:
                async with pool.query():
                    pass
            assert opening.cancelled_caught  # the caller left at once
            with trio.move_on_after(1) as waited:
                async with pool.room():
                    pass
            assert waited.cancelled_caught  # the place is still the opening's
            silent.close()  # the PACS goes away: the opening fails, and its place is free
            async with pool.room():
                pass
            await pool.aclose()
    finally:
        silent.close()




@pytest.mark.mount  # (processes of its own: a first import of pynetdicom and pydicom in each)
def test_dimse_work_that_first_uses_pynetdicom_in_threads_at_once_gets_it_whole() -> None:
    """A C-FIND identifier made on the event loop, associations opened in worker threads and a
    frame cut in another, all first in their process: each got half-made pydicom modules ("cannot
    import name 'UID' from partially initialized module 'pydicom.uid'") in 40 runs of 40 before
    ``imports.import_pynetdicom``. Each run is a fresh process whose six threads start together."""
    setup = "from dicomfs import frames\nfrom dicomfs.sources.dimse import contexts, net, query, status"
    assert_imports_whole(setup, [
        "query.identifier('STUDY')", "net.socket_handlers()",
        "net.application_entity(net.Peer('127.0.0.1', 1, 'PACS'), [])",
        "contexts.retrieve_contexts(query.STUDY_ROOT_GET, ['1.2.840.10008.5.1.4.1.1.2'])",
        "status.failure('the PACS', 'C-FIND', 'the studies', 0xC000)", "frames.cut_frames(data)"], runs=8)
