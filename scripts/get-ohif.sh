#!/usr/bin/env bash
# Fetch a pinned build of the OHIF Viewer (the dist/ folder of @ohif/app, from npm) for
# `dicomfs serve --viewer DIR`, or for nginx (docs/serving.md). Nothing of OHIF is committed here.
#   scripts/get-ohif.sh [DIR]     default DIR: .ohif/<version>; prints DIR when it is ready
# Needs curl, tar and openssl (no node, no npm): the tarball is checked against npm's sha512.
# Safe to run again: a DIR that holds the build already is left as it is.
set -euo pipefail
cd "$(dirname "$0")/.."

version=3.13.2
integrity="sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA=="
dest=${1:-.ohif/$version}

if [ -f "$dest/index.html" ] && [ -f "$dest/.ohif-version" ] && [ "$(cat "$dest/.ohif-version")" = "$version" ]; then
    echo "$dest"
    exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
curl -sSfL --retry 3 -o "$tmp/app.tgz" "https://registry.npmjs.org/@ohif/app/-/app-$version.tgz"
got="sha512-$(openssl dgst -sha512 -binary "$tmp/app.tgz" | base64 -w0)"
if [ "$got" != "$integrity" ]; then
    echo "get-ohif.sh: @ohif/app $version from npm does not have the expected sha512 ($got)" >&2
    exit 1
fi
tar -xzf "$tmp/app.tgz" -C "$tmp" package/dist
mkdir -p "$(dirname "$dest")"
rm -rf "$dest"
mv "$tmp/package/dist" "$dest"
echo "$version" > "$dest/.ohif-version"
echo "$dest"
