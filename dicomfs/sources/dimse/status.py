"""DIMSE statuses as dicomfs errors: what the status of a C-FIND, C-GET or C-MOVE answer means.

Owns the reading of a status (none at all: the PACS went silent or away), the pending codes, the
codes by which a PACS refuses C-GET (then C-MOVE is worth trying), and the one-line error of a
failure, in the words of pynetdicom's status tables. Sans-I/O. Must not talk to the network.
"""

from __future__ import annotations

from typing import Any

from dicomfs.errors import ProtocolError, SourceError, SourceUnavailable
from dicomfs.sources.dimse.imports import import_pynetdicom

PENDING = frozenset({0xFF00, 0xFF01})
SUCCESS = 0x0000
SOME_FAILED = 0xB000  # a retrieve ended with some sub-operations failed
# What a PACS answers when it will not serve C-GET to us (then C-MOVE is worth trying)
GET_REFUSALS = frozenset({0x0122, 0x0124, 0xA701, 0xA702, 0xA900, 0xAA00, 0xAA01, 0xAA02, 0xAA03, 0xAA04})
_TABLES = {"C-FIND": "QR_FIND_SERVICE_CLASS_STATUS", "C-GET": "QR_GET_SERVICE_CLASS_STATUS",
           "C-MOVE": "QR_MOVE_SERVICE_CLASS_STATUS"}


class GetRefused(SourceError):
    """The PACS will not do C-GET for us (no such context, or a refusal status): try C-MOVE."""


def code_of(status: Any, description: str, what: str) -> int:
    """The status code of a DIMSE answer; no answer at all means the PACS went silent or away."""
    code = getattr(status, "Status", None) if status else None
    if code is None:
        raise SourceUnavailable(f"{description} did not answer about {what} (not within --timeout, or it ended "
                                "the association; a PACS that takes longer needs a larger --timeout)")
    return int(code)


def failure(description: str, service: str, what: str, code: int, destination: str | None = None) -> SourceError:
    """A failure status of a C-FIND, C-GET or C-MOVE as one line that says what it means
    (``destination``: where a C-MOVE was to send, for the line that asks the PACS to know it)."""
    import_pynetdicom()
    from pynetdicom import status

    if code == 0xA801:
        return ProtocolError(f"{description} does not know the C-MOVE destination (status 0xA801): register "
                             f"{destination or 'dicomfs, with this address and the --move-port,'} there as a "
                             "destination")
    table = {**status.GENERAL_STATUS, **getattr(status, _TABLES[service])}
    meaning = table.get(code, ("", ""))[1] or ("unable to process" if 0xC000 <= code <= 0xCFFF else "unknown")
    error = SourceError(f"{description}: {service} of {what} failed with status 0x{code:04X} ({meaning})")
    if service == "C-GET" and code in GET_REFUSALS:
        return GetRefused(str(error))
    return error
