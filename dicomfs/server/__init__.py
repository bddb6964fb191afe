"""``dicomfs serve``: any archive as a DICOMweb service (and a viewer), without a mount.

The same catalog, blob store and renderer (``webtree``/``webfiles``) as the mount's ``dicomweb/``
tree, behind an ASGI application (``app``) on hypercorn's trio worker (``run``): QIDO-RS with
real filtering (``qido``), WADO-RS (``wado``), content negotiation (``accept``), the viewer's
files (``viewer``). See docs/serving.md.
"""
