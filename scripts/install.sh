#!/usr/bin/env bash
# Install dicomfs and everything it needs on Debian: system packages (FUSE 3, its headers, a
# compiler for pyfuse3) and a virtualenv in .venv with dicomfs installed from this checkout.
#   scripts/install.sh          what dicomfs needs to run
#   scripts/install.sh --test   also what the test suite needs (Orthanc, dcmtk, rsync, GCS emulator)
#   scripts/install.sh --bench  also what the benchmarks compare against (rclone, py-spy, dicomtrolley)
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

want_tests=0
want_bench=0
[ "${1:-}" = "--test" ] && want_tests=1
[ "${1:-}" = "--bench" ] && want_tests=1 && want_bench=1

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"

packages=(fuse3 libfuse3-dev pkg-config gcc python3 python3-venv python3-dev)
if [ "$want_tests" = 1 ]; then
    packages+=(orthanc orthanc-dicomweb dcmtk rsync tar curl systemd)
fi
if [ "$want_bench" = 1 ]; then
    packages+=(rclone)
fi
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing Debian packages: ${missing[*]}"
    $sudo apt-get update -qq
    # Orthanc's package would start a system service; tests run their own instances instead.
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
target="."
[ "$want_tests" = 1 ] && target=".[test]"
[ "$want_bench" = 1 ] && target=".[test,bench]"
# pip is chatty on stderr even when all is well: keep its output, show it only if it fails.
if ! .venv/bin/python -m pip install -q -e "$target" > .venv/pip-install.log 2>&1; then
    cat .venv/pip-install.log >&2
    echo "pip install failed (log: .venv/pip-install.log)" >&2
    exit 1
fi
echo "dicomfs installed: $(.venv/bin/dicomfs --version) in $(pwd)/.venv"
