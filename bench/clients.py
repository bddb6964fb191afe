"""The download loops people script today, as baselines for ``bench.prefetch``.

    python -m bench.clients dicomweb-client URL OUTDIR STUDY...
    python -m bench.clients dicomtrolley URL OUTDIR STUDY...

Each downloads the studies to OUTDIR the way its library's documentation shows, one study after
another, and exits non-zero on any error.
"""

from __future__ import annotations

import sys
from pathlib import Path


def dicomweb_client(url: str, out: Path, studies: list[str]) -> None:
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url)
    for study in studies:
        # Ask for the stored transfer syntax: without it Orthanc transcodes every instance.
        for ds in client.retrieve_study(study, media_types=(("application/dicom", "*"),)):
            path = out / ds.StudyInstanceUID / ds.SeriesInstanceUID / f"{ds.SOPInstanceUID}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(path, enforce_file_format=True)


def dicomtrolley(url: str, out: Path, studies: list[str]) -> None:
    import requests
    from dicomtrolley.core import StudyReference
    from dicomtrolley.qido_rs import QidoRS
    from dicomtrolley.trolley import Trolley
    from dicomtrolley.wado_rs import WadoRS

    session = requests.Session()
    trolley = Trolley(downloader=WadoRS(session, url), searcher=QidoRS(session, url))
    for study in studies:
        trolley.download(StudyReference(study_uid=study), output_dir=str(out))


def main(argv: list[str]) -> int:
    tool, url, out, *studies = argv
    Path(out).mkdir(parents=True, exist_ok=True)
    {"dicomweb-client": dicomweb_client, "dicomtrolley": dicomtrolley}[tool](url, Path(out), studies)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
