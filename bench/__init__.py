"""The dicomfs benchmark (see bench/README.md)."""
