"""The web viewer ``dicomfs serve --viewer DIR`` serves beside the DICOMweb root.

Owns serving a built single-page viewer (OHIF's ``dist/``: ``scripts/get-ohif.sh``) from its
folder: files by path, never outside the folder (symbolic links included), the app's
``index.html`` for any other path without a file extension (the viewer's own routes, such as
``/viewer?StudyInstanceUIDs=…``), and an ``app-config.js`` written for the served DICOMweb root
(same origin, so no CORS is needed). Must not know DICOMweb beyond the root's path.
"""

from __future__ import annotations

import mimetypes
import os
from pathlib import Path

import trio

from dicomfs.errors import NotFound, UsageError
from dicomfs.server.wado import Body

CONFIG_NAME = "app-config.js"
TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".css": "text/css", ".html": "text/html",
         ".json": "application/json", ".wasm": "application/wasm", ".svg": "image/svg+xml",
         ".map": "application/json", ".woff2": "font/woff2", ".ico": "image/x-icon", ".png": "image/png",
         ".txt": "text/plain"}

# OHIF 3 reads ``window.config`` from app-config.js before it starts. One data source: this server,
# at the page's own origin. ``omitQuotationForMultipartRequest`` keeps frame requests "simple"
# (no CORS preflight even cross-origin); ``relativeResolution: 'studies'`` resolves the metadata's
# BulkDataURIs (``bulkdata/<series>/<sop>/<tags>``, relative to the study) where they are served.
APP_CONFIG = """window.config = {
  routerBasename: '/',
  showStudyList: true,
  extensions: [],
  modes: [],
  investigationalUseDialog: { option: 'never' },
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  defaultDataSourceName: 'dicomfs',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'dicomfs',
      configuration: {
        friendlyName: 'dicomfs serve',
        name: 'dicomfs',
        wadoUriRoot: window.location.origin + '%(root)s',
        qidoRoot: window.location.origin + '%(root)s',
        wadoRoot: window.location.origin + '%(root)s',
        qidoSupportsIncludeField: true,
        supportsReject: false,
        supportsStow: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: true,
        supportsWildcard: true,
        staticWado: false,
        singlepart: 'bulkdata,video',
        omitQuotationForMultipartRequest: true,
        bulkDataURI: { enabled: true, relativeResolution: 'studies' },
      },
    },
  ],
};
"""


class Viewer:
    def __init__(self, folder: Path, dicomweb_root: str) -> None:
        self.folder = Path(os.path.realpath(folder))
        if not (self.folder / "index.html").is_file():
            raise UsageError(f"--viewer {folder}: no index.html there (give the built viewer's folder, e.g. OHIF's "
                             "dist/ from scripts/get-ohif.sh)")
        self.config = (APP_CONFIG % {"root": dicomweb_root}).encode()

    async def file(self, url_path: str) -> Body:
        """The file answering ``url_path``. Raises NotFound."""
        relative = url_path.lstrip("/")
        if relative == CONFIG_NAME:
            return Body("text/javascript", self.config)
        if relative == "":
            relative = "index.html"
        path = self._inside(relative)
        if path is None:
            raise NotFound(url_path[:200])  # (a path that would leave the folder, or an odd one)
        if not await trio.to_thread.run_sync(path.is_file):
            if "." in relative.rsplit("/", 1)[-1]:
                raise NotFound(url_path[:200])
            path = self.folder / "index.html"  # one of the app's routes
        data = await trio.to_thread.run_sync(path.read_bytes)
        media_type = TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return Body(media_type, data, ranges=True)

    def _inside(self, relative: str) -> Path | None:
        """``relative`` below the folder, if it stays there once every link is resolved."""
        if "\0" in relative or any(part in ("", ".", "..") for part in relative.split("/")):
            return None
        path = os.path.realpath(self.folder / relative)
        return Path(path) if path.startswith(str(self.folder) + os.sep) else None
