"""The Imaging Data Commons source (``idc``): the index (``index``) and the buckets (``source``)."""

from dicomfs.sources.idc.index import INDEX_KEYS, IdcIndex, default_index
from dicomfs.sources.idc.source import IdcSource

__all__ = ["INDEX_KEYS", "IdcIndex", "IdcSource", "default_index"]
