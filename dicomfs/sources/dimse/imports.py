"""pynetdicom imported whole, once, under a lock, after pydicom (``dicomread.import_pydicom``).

pydicom's modules import each other in a cycle, and pynetdicom imports pydicom's: a thread that
first imports part of either while another thread does got a half-made module ("cannot import
name 'UID' from partially initialized module 'pydicom.uid'"): a C-FIND's identifier made on the
event loop while a worker thread cut a frame, or two associations opened at once. Every function
of this package that imports pynetdicom, or pydicom, calls ``import_pynetdicom`` first (after the
first call: two locks and a few dictionary lookups). Must not do anything else.
"""

from __future__ import annotations

import threading

from dicomfs.dicomread import import_pydicom

_PYNETDICOM_IMPORT = threading.Lock()


def import_pynetdicom() -> None:
    import_pydicom()
    with _PYNETDICOM_IMPORT:
        import pynetdicom  # noqa: F401
        import pynetdicom.pdu_primitives  # noqa: F401
        import pynetdicom.status  # noqa: F401
