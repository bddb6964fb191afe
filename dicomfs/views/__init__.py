"""The views: the folders at the root of a mount, each one way of laying out the same archive.

``studies/`` (UIDs, ``studies``), the readable views ``patients/``, ``dates/``, ``collections/``
(IDC, with each collection's notes: ``collections``) and ``--view`` templates (``named``,
``template``, ``names``) and the static DICOMweb tree ``dicomweb/``
(``dicomweb``), all against one protocol (``base.View``) that the tree calls. This module owns the
choice of views (``--views``, ``--view``, ``--ascii-names``) and building them. Must not know
pyfuse3.
"""

from __future__ import annotations

from dataclasses import dataclass

from dicomfs.cache import BlobStore
from dicomfs.catalog import Catalog
from dicomfs.errors import UsageError
from dicomfs.readahead import Readahead
from dicomfs.search import Shown
from dicomfs.sources.base import NotesSource
from dicomfs.views.base import STUDIES, InstanceFiles, View
from dicomfs.views.collections import CollectionsView
from dicomfs.views.dicomweb import DICOMWEB, DicomwebView
from dicomfs.views.named import NamedView
from dicomfs.views.studies import StudiesView
from dicomfs.views.template import BUILT_IN, Template, parse, parse_view
from dicomfs.webfiles import WebFiles

DEFAULT_VIEWS = (STUDIES, "patients", "dates", DICOMWEB)
COLLECTIONS = "collections"  # IDC: patient IDs repeat across collections, so each has its folder
KNOWN_VIEWS = (*DEFAULT_VIEWS, COLLECTIONS)


@dataclass(frozen=True)
class ViewOptions:
    chosen: tuple[str, ...] = DEFAULT_VIEWS  # built-in views, in root order
    custom: tuple[tuple[str, Template], ...] = ()  # --view NAME=TEMPLATE
    ascii_names: bool = False

    @classmethod
    def parse(cls, views: str | None, custom: list[str], ascii_names: bool,
              defaults: tuple[str, ...] = DEFAULT_VIEWS) -> ViewOptions:
        """From the command line; a bad choice or template is a one-line ``UsageError``.
        ``defaults``: the views when ``--views`` names none (an IDC mount adds ``collections``)."""
        chosen: tuple[str, ...] = defaults
        if views is not None:
            chosen = tuple(dict.fromkeys(v.strip() for v in views.split(",") if v.strip()))
            unknown = [v for v in chosen if v not in KNOWN_VIEWS]
            if unknown:
                raise UsageError(f"--views: unknown view {unknown[0]!r} (choose from {', '.join(KNOWN_VIEWS)})")
        templates = tuple(parse_view(spec) for spec in custom)
        names = [*chosen, *(name for name, _ in templates)]
        for name in names:
            if names.count(name) > 1:
                raise UsageError(f"--view {name}: there is already a view called {name!r}")
        if not names:
            raise UsageError("--views: choose at least one view")
        return cls(chosen, templates, ascii_names)


def make_views(catalog: Catalog, blobs: BlobStore, shown: Shown, options: ViewOptions | None = None,
               readahead: Readahead | None = None) -> list[View]:
    options = options or ViewOptions()
    files = InstanceFiles(blobs, readahead)
    views: list[View] = []
    for name in options.chosen:
        if name == COLLECTIONS:
            named = NamedView(name, parse(BUILT_IN[name]), catalog, shown, files, ascii_names=options.ascii_names)
            source = catalog.source
            views.append(CollectionsView(named, source.collection_notes) if isinstance(source, NotesSource)
                         else named)
        elif name == STUDIES:
            views.append(StudiesView(catalog, shown, files))
        elif name == DICOMWEB:
            views.append(DicomwebView(WebFiles(catalog, blobs, studies=shown.studies)))
        else:
            views.append(NamedView(name, parse(BUILT_IN[name]), catalog, shown, files,
                                   ascii_names=options.ascii_names))
    for name, template in options.custom:
        views.append(NamedView(name, template, catalog, shown, files, ascii_names=options.ascii_names))
    return views
