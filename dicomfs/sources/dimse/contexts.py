"""Which presentation contexts dicomfs proposes for a retrieve, so that the PACS sends each
instance in the transfer syntax it stores it in.

A PACS picks, for every instance it sends by C-GET, a presentation context of the instance's SOP
class; given one context listing many transfer syntaxes it settles on one of them and transcodes
(measured on Orthanc: everything arrives as explicit VR little endian). One context per (SOP
class, transfer syntax) pair lets it send each instance as stored. Owns that choice within the
limit of 128 contexts per association (one of them for the retrieve itself), the transfer
syntaxes in order of preference, and the SCP roles C-GET needs. Pure: builds pynetdicom objects,
no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from dicomfs.sources.dimse.imports import import_pynetdicom

MAX_CONTEXTS = 128
# Most frequent first: when contexts run short, the rare ones go.
TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2.1",  # explicit VR little endian
    "1.2.840.10008.1.2",  # implicit VR little endian
    "1.2.840.10008.1.2.4.70",  # JPEG lossless, first-order prediction
    "1.2.840.10008.1.2.4.50",  # JPEG baseline
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.5",  # RLE lossless
    "1.2.840.10008.1.2.4.51",  # JPEG extended
    "1.2.840.10008.1.2.4.57",  # JPEG lossless
    "1.2.840.10008.1.2.1.99",  # deflated explicit VR little endian
    "1.2.840.10008.1.2.2",  # explicit VR big endian (retired, still stored)
    "1.2.840.10008.1.2.4.201",  # HTJ2K lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K lossless RPCL
    "1.2.840.10008.1.2.4.203",  # HTJ2K
    "1.2.840.10008.1.2.4.100",  # MPEG-2
    "1.2.840.10008.1.2.4.102",  # MPEG-4 AVC/H.264
    "1.2.840.10008.1.2.4.107",  # HEVC/H.265
)


def storage_pairs(sop_classes: Iterable[str], room: int = MAX_CONTEXTS - 1) -> list[tuple[str, str]]:
    """(SOP class, transfer syntax) pairs, one context each: every class gets the same number of
    syntaxes, as many as ``room`` allows (at least one: explicit little endian)."""
    classes = sorted(set(sop_classes))
    if not classes:
        return []
    per_class = max(1, min(len(TRANSFER_SYNTAXES), room // len(classes)))
    pairs = [(sop_class, syntax) for syntax in TRANSFER_SYNTAXES[:per_class] for sop_class in classes]
    return pairs[:room]


def retrieve_contexts(model: str, sop_classes: Iterable[str]) -> tuple[list[Any], list[Any]]:
    """The contexts and SCP/SCU role items of a C-GET association: the retrieve model, and one
    storage context per (SOP class, transfer syntax) with dicomfs in the SCP role."""
    import_pynetdicom()
    from pynetdicom import build_context, build_role

    pairs = storage_pairs(sop_classes)
    contexts = [build_context(model)] + [build_context(sop_class, syntax) for sop_class, syntax in pairs]
    roles = [build_role(sop_class, scp_role=True) for sop_class in sorted({c for c, _ in pairs})]
    return contexts, roles
