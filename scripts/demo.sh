#!/usr/bin/env bash
# Install everything, then mount the built-in demo archive and show what is in it.
#   scripts/demo.sh [MOUNTPOINT]      (default: ~/dicom-demo)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
mountpoint=${1:-$HOME/dicom-demo}
mkdir -p "$mountpoint"
if grep -qs " $(realpath "$mountpoint") fuse" /proc/mounts; then
    .venv/bin/dicomfs umount "$mountpoint"
fi
.venv/bin/dicomfs mount demo "$mountpoint"
echo
echo "The demo archive is mounted at $mountpoint:"
find "$mountpoint/studies" -maxdepth 2 | head -12 || true
echo "..."
echo "$(find "$mountpoint/studies" -name '*.dcm' | wc -l) instance files, $(du -sh --apparent-size "$mountpoint/studies" | cut -f1) in all."
first=$(find "$mountpoint/studies" -name "*.dcm" | sort | head -1 || true)
echo
echo "One of them, read with pydicom:"
.venv/bin/python -c "import pydicom, sys; ds = pydicom.dcmread(sys.argv[1]); print(' ', ds.PatientName, ds.Modality, ds.file_meta.TransferSyntaxUID.name, ds.Rows, 'x', ds.Columns)" "$first"
echo
echo "The same archive as a static DICOMweb tree (serve it with nginx: docs/serving.md):"
.venv/bin/python -c "
import gzip, json, sys
studies = json.loads(gzip.decompress(open(sys.argv[1] + '/dicomweb/studies/index.json.gz', 'rb').read()))
print(f'  dicomweb/studies/index.json.gz lists {len(studies)} studies, e.g. '
      f\"{studies[0]['0020000D']['Value'][0]} ({', '.join(studies[0].get('00080061', {}).get('Value', []))})\")
" "$mountpoint"
echo
echo "Unmount with: $(pwd)/.venv/bin/dicomfs umount $mountpoint"
