#!/usr/bin/env bash
# Install dicomfs and everything it needs on Debian: system packages (FUSE 3, its headers, a
# compiler for pyfuse3) and a virtualenv in .venv with dicomfs installed from this checkout.
#   scripts/install.sh          what dicomfs needs to run
#   scripts/install.sh --test   also what the test suite needs (Orthanc, nginx, dcmtk, rsync, openssl, GCS emulator,
#                                Xvfb, xwd and the aeskulap viewer for the desktop-viewer test, Chromium and
#                                Playwright and the pinned OHIF build (scripts/get-ohif.sh) for the web-viewer
#                                tests, util-linux and passwd for the mount-namespace, tmpfs and second-user tests)
#   scripts/install.sh --bench  also what the benchmarks compare against (rclone, py-spy, dicomtrolley)
#   scripts/install.sh --idc    also the Imaging Data Commons index (idc-index-data, duckdb); --test includes it
# Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

want_tests=0
want_bench=0
want_idc=0
[ "${1:-}" = "--test" ] && want_tests=1 && want_idc=1
[ "${1:-}" = "--bench" ] && want_tests=1 && want_bench=1 && want_idc=1
[ "${1:-}" = "--idc" ] && want_idc=1

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"

packages=(fuse3 libfuse3-dev pkg-config gcc python3 python3-venv python3-dev)
if [ "$want_tests" = 1 ]; then
    packages+=(orthanc orthanc-dicomweb nginx dcmtk rsync tar curl systemd util-linux passwd openssl
               xvfb x11-apps aeskulap chromium)
fi
if [ "$want_bench" = 1 ]; then
    packages+=(rclone)
fi
missing=()
for package in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done

# Orthanc's and nginx's packages would start system services (nginx on port 80); the tests run
# their own instances on loopback instead. While apt-get runs, a policy-rc.d that answers 101
# ("action forbidden") stops invoke-rc.d and deb-systemd-invoke from starting anything. We only
# create it when there is none (a Docker image ships its own) and remove it afterwards, even on
# failure or Ctrl-C, and only if it is ours (it carries a marker, so one left behind by a killed
# run is recognised and cleaned up by the next run).
policy=/usr/sbin/policy-rc.d
policy_marker="# dicomfs install.sh: no services started during apt-get install"
policy_ours=0
remove_policy() {
    if [ "$policy_ours" = 1 ] && grep -qxF "$policy_marker" "$policy" 2>/dev/null; then
        $sudo rm -f "$policy"
    fi
    policy_ours=0
}
if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing Debian packages: ${missing[*]}"
    if grep -qxF "$policy_marker" "$policy" 2>/dev/null; then
        policy_ours=1
    elif [ ! -e "$policy" ] \
        && printf '#!/bin/sh\n%s\nexit 101\n' "$policy_marker" | $sudo sh -c "set -C; cat > $policy" 2>/dev/null; then
        policy_ours=1  # set -C (noclobber): created only if it did not exist a moment ago
    fi
    if [ "$policy_ours" = 1 ]; then
        trap remove_policy EXIT
        trap 'exit 130' INT TERM HUP
        $sudo chmod 755 "$policy"
    fi
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    remove_policy
    trap - EXIT INT TERM HUP
    if [[ " ${missing[*]} " == *" nginx "* ]]; then
        # We installed nginx only for the tests: make sure no system nginx is left running (a
        # pre-existing policy-rc.d that allows starts would have let the postinst start it; as
        # nginx was not installed before, a /usr/sbin/nginx owning /run/nginx.pid is that one)
        # and keep it from starting at boot or on upgrades. An nginx the machine already had is
        # never touched: this branch runs only when the package was missing.
        $sudo start-stop-daemon --stop --quiet --retry=TERM/10/KILL/5 --pidfile /run/nginx.pid \
            --exec /usr/sbin/nginx >/dev/null 2>&1 || true
        $sudo update-rc.d nginx disable >/dev/null 2>&1 || true
        if command -v deb-systemd-helper >/dev/null; then
            $sudo deb-systemd-helper disable nginx.service >/dev/null 2>&1 || true
        fi
        echo "nginx installed for the tests; its system service is disabled" \
            "(to serve dicomfs with it, see docs/serving.md)"
    fi
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv .venv
fi
target="."
[ "$want_idc" = 1 ] && target=".[idc]"
[ "$want_tests" = 1 ] && target=".[test,idc]"
[ "$want_bench" = 1 ] && target=".[test,idc,bench]"
# pip is chatty on stderr even when all is well: keep its output, show it only if it fails.
if ! .venv/bin/python -m pip install -q -e "$target" > .venv/pip-install.log 2>&1; then
    cat .venv/pip-install.log >&2
    echo "pip install failed (log: .venv/pip-install.log)" >&2
    exit 1
fi
# An editable install leaves dicomfs's own modules uncompiled, and where PYTHONDONTWRITEBYTECODE is
# set (many container images) every start compiles them again: ~0.1 s of each `dicomfs prefetch`,
# `mount` or `ls` (measured with -X importtime). Compile them once; Python recompiles (in memory)
# any module changed since, so a stale file costs nothing but that.
.venv/bin/python -m compileall -q dicomfs > /dev/null
if [ "$want_tests" = 1 ]; then
    echo "OHIF for the web-viewer tests: $(bash scripts/get-ohif.sh)"
fi
echo "dicomfs installed: $(.venv/bin/dicomfs --version) in $(pwd)/.venv"
