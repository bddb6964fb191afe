"""The DIMSE source's pure parts: C-FIND identifiers and answers, presentation contexts, the
Part 10 wrapper (checked by pydicom and dcmtk's dcmftest), the source string, and what the daemon
and its retrieve workers say to each other through a real pipe."""

from __future__ import annotations

import logging
import socket
import subprocess
from pathlib import Path

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
    job = retrieve.Job("dimse://PACS@10.0.0.5:104", "PACS", "1.2", "1.2.3", {"1.2.3.4": "1.2.840.10008.5.1.4.1.1.7"},
                       lambda key, head, data: delivered.append(key) or True)
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
