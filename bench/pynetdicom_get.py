"""The floor of a pynetdicom client: one STUDY-level C-GET into a folder, as ``getscu -S`` does it.

    python bench/pynetdicom_get.py CALLING_AE CALLED_AE HOST PORT STUDY_UID OUT_DIR SOP_CLASS...

What any DIMSE client built on pynetdicom (as the DIMSE issue asks dicomfs to be) needs at least:
start Python, import pynetdicom, open one association proposing the storage SOP classes given (in
every transfer syntax, with the SCP role), send one C-GET at STUDY level, and write each instance
as it arrives (file meta by pydicom's writer, then the data set bytes as received). Nothing else:
no listing, no cache, no checks. It gets the same socket settings dicomfs gives its retrieves
(``TCP_NODELAY``; ``TCP_QUICKACK`` after each PDU sent, without which a PACS that leaves Nagle on
stalls every instance 40 ms; a 0.2 ms DUL loop), so that what it shows is pynetdicom's own cost.
Deliberately standalone (no dicomfs import: trio and the rest would count against the floor).
Prints the seconds from opening the association to its release (the retrieve alone, without
starting Python and importing pynetdicom); exit status 0 when the C-GET ended in success.
"""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # types only, never imported at run time (the floor counts every import)
    from pynetdicom.events import EventHandlerType
    from pynetdicom.pdu_primitives import _UI


def _set(event: Any, option: int) -> None:
    try:
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, option, 1)
    except (AttributeError, OSError):
        pass


def main(argv: list[str]) -> int:
    calling, called, host, port, study, out, *sop_classes = argv
    # pynetdicom.sop_class makes its names at import time (globals()): mypy sees none of them
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filewriter import write_file_meta_info
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, build_role, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet  # type: ignore[attr-defined]

    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)

    def store(event: Any) -> int:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = event.request.AffectedSOPClassUID
        meta.MediaStorageSOPInstanceUID = event.request.AffectedSOPInstanceUID
        meta.TransferSyntaxUID = event.context.transfer_syntax
        with open(folder / f"{event.request.AffectedSOPInstanceUID}.dcm", "wb") as file:
            file.write(b"\0" * 128 + b"DICM")
            # pydicom annotates fp as DicomIO, but only calls fp.write (its docs: any file-like)
            write_file_meta_info(file, meta, enforce_standard=True)  # type: ignore[arg-type]
            file.write(event.request.DataSet.getvalue())
        return 0x0000

    started = time.perf_counter()
    ae = AE(ae_title=calling)
    ae.maximum_pdu_size = 0
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    for sop_class in sop_classes:
        ae.add_requested_context(sop_class, ALL_TRANSFER_SYNTAXES)
    roles: list[_UI] = [build_role(sop_class, scp_role=True) for sop_class in sop_classes]
    handlers: list[EventHandlerType] = [(evt.EVT_C_STORE, store),
                                        (evt.EVT_CONN_OPEN, lambda e: _set(e, socket.TCP_NODELAY)),
                                        (evt.EVT_DATA_SENT, lambda e: _set(e, socket.TCP_QUICKACK))]
    assoc = ae.associate(host, int(port), ae_title=called, ext_neg=roles, evt_handlers=handlers)
    if not assoc.is_established:
        return 2
    assoc.dul._run_loop_delay = 0.0002
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = study
    final = None
    for status, _ in assoc.send_c_get(identifier, StudyRootQueryRetrieveInformationModelGet):
        final = getattr(status, "Status", None)
    assoc.release()
    print(f"{time.perf_counter() - started:.6f}")
    return 0 if final == 0x0000 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
