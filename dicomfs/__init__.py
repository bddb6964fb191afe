"""dicomfs: mount a remote DICOM archive as ordinary read-only folders."""

__version__ = "0.1.0"
