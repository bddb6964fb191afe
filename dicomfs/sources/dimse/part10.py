"""Part 10 files from instances received over DIMSE.

A C-STORE sub-operation carries a data set, encoded in the transfer syntax of its presentation
context, without preamble or file meta information. Owns turning that into a Part 10 file: the
128-byte preamble, ``DICM``, a group 0002 written by dicomfs (media storage SOP class and
instance, the transfer syntax it arrived in, dicomfs's implementation class UID and version, the
AE title it came from) and the data set bytes exactly as received. Must not decode or re-encode
the data set: a DIMSE archive sends its own encoding of an instance, so the file equals the
stored instance element by element, not necessarily byte for byte.
"""

from __future__ import annotations

import uuid

from dicomfs import __version__

# dicomfs's implementation class UID: a UUID-derived UID (PS3.5 B.2), the same in every version
IMPLEMENTATION_CLASS_UID = f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, 'https://github.com/dicomfs/dicomfs').int}"
IMPLEMENTATION_VERSION = f"DICOMFS_{__version__}"[:16]


def header(sop_class: str, sop_instance: str, transfer_syntax: str, source_ae: str) -> bytes:
    """What comes before a received data set's bytes to make them a Part 10 file (written as two
    pieces, the data set is not copied)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import UID

    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    if source_ae:
        meta.SourceApplicationEntityTitle = source_ae[:16]
    out = DicomBytesIO()
    out.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=True)
    return out.getvalue()
