#!/usr/bin/env bash
# Fetches the WebChat's browser libraries into static/vendor/, pinned by exact version and
# checked by sha256, with their licences. The results are committed (the binary embeds them
# and the page needs no build step); run this only to upgrade, then update the pins below.
#
# markdown-it's dist build bundles entities, linkify-it, mdurl, punycode.js and uc.micro:
# their packages are fetched only for their licence files.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
dest="$root/static/vendor"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# package@version  sha256 of the npm tarball
pins=(
  "markdown-it@14.1.0 7c4fab4d4d39fe98206a7fbbed4b1e3578f2b70b6b69d309413e33eec140e19f"
  "entities@4.5.0 6b0c60f7351a0b65bb1fc8dbb9299f09e7ecf6d89103d0651bf369e6f463a632"
  "linkify-it@5.0.0 6144c5a52d26c2bb917bc320d707cf4a41c94514ce856b8b1baf934d3fb27aa9"
  "mdurl@2.0.0 8e0ccb320730dad17981e2a4cc97f34f072366442d000de97070fd1ea21321b5"
  "punycode.js@2.3.1 8768d89aa6359164220014ba575e1464e3ddff11bedff1cc268e39a21f7324a8"
  "uc.micro@2.1.0 a31660c690ddac370fe4b17fe6a3a73b8df094f99194ac90d0668d797dabf69b"
)

mkdir -p "$dest/licenses"
for pin in "${pins[@]}"; do
  spec="${pin% *}"
  want="${pin#* }"
  name="${spec%@*}"
  (cd "$work" && npm pack --silent "$spec" >/dev/null)
  tarball="$work/$(echo "$name" | tr -d '@' | tr '/' '-')-${spec##*@}.tgz"
  got="$(sha256sum "$tarball" | cut -c1-64)"
  if [ "$got" != "$want" ]; then
    echo "vendor-web: $spec: sha256 $got, expected $want" >&2
    exit 1
  fi
  mkdir -p "$work/$name"
  tar xzf "$tarball" -C "$work/$name"
  licence="$(find "$work/$name/package" -maxdepth 1 -iname 'licen[cs]e*' | head -n 1)"
  if [ -z "$licence" ]; then
    echo "vendor-web: $spec has no licence file" >&2
    exit 1
  fi
  cp "$licence" "$dest/licenses/$name.txt"
done

cp "$work/markdown-it/package/dist/markdown-it.min.js" "$dest/markdown-it.min.js"
(cd "$dest" && sha256sum markdown-it.min.js licenses/*.txt > SHA256SUMS)
echo "vendor-web: static/vendor updated; review the diff and commit it"
