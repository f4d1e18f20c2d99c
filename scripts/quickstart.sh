#!/usr/bin/env bash
# Quick start on a fresh Debian machine: make a venv (Debian's Python refuses pip outside one),
# install modelcar into it, and build the bundled example model into a local OCI layout.
# No network beyond the package index, no registry, no Docker.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv
  else
    echo "python3-venv is missing: run 'sudo apt-get install python3-venv' first" >&2
    exit 2
  fi
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check .
.venv/bin/modelcar build -c examples/catalog.yaml "$@"
# Pin the serving overlays to the image just built (not pushed: --allow-unpushed pins the
# catalog's registry/<name> with the digest it will have there).
.venv/bin/modelcar patch -c examples/catalog.yaml --allow-unpushed
echo
echo "The image is in examples/.modelcar/oci (an OCI image layout); its digest is pinned in examples/catalog.lock"
echo "and in the kustomize overlays under examples/serving/overlays (modelcar-tiny-chat.yaml in each overlay the catalog lists)."
echo "Try: .venv/bin/modelcar inspect oci:examples/.modelcar/oci:tiny-chat"
