#!/usr/bin/env bash
# Install what the tests need and run them all: lint, types, and the pytest suite against real
# parts (docker-registry, skopeo, umoci, buildah, htpasswd, containerd from apt; Python extras in .venv).
# System tools are installed through apt-get when this runs as root and they are missing.
set -euo pipefail
cd "$(dirname "$0")/.."

declare -A tools=([docker-registry]=docker-registry [skopeo]=skopeo [umoci]=umoci [buildah]=buildah [htpasswd]=apache2-utils
  [containerd]=containerd)
missing=()
for tool in "${!tools[@]}"; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("${tools[$tool]}")
done
python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
# A static busybox for the KServe/init-copy shell base (containerfiles/busybox-base); the plain
# `busybox` package is dynamically linked and does not run in a scratch image.
dpkg -s busybox-static >/dev/null 2>&1 || missing+=(busybox-static)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "test.sh: installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "test.sh: missing ${missing[*]} (run as root to install them); tests that need them will fail under CI" >&2
  fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'

.venv/bin/ruff check modelcar tests scripts
.venv/bin/ruff format --check modelcar tests scripts
.venv/bin/mypy
# The declared lower bounds of the runtime dependencies, together (scripts/min-deps.txt): the tests
# of the Hub, the lock, the catalog and the build, with the oldest releases a user may have. On the
# oldest Python this supports (3.11), where they all have wheels; the venv is made anew when the
# floors or the dependencies change.
if [ $# -eq 0 ] && python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  stamp=$(cat scripts/min-deps.txt pyproject.toml | sha256sum | cut -c1-16)
  if [ "$(cat .venv-min/.stamp 2>/dev/null)" != "$stamp" ]; then
    rm -rf .venv-min
    python3 -m venv .venv-min
    .venv-min/bin/pip install -q --disable-pip-version-check -e '.[test]' -c scripts/min-deps.txt
    echo "$stamp" > .venv-min/.stamp
  fi
  .venv-min/bin/pytest -q -p no:cacheprovider tests/test_hub.py tests/test_lock.py tests/test_catalog.py \
    tests/test_build.py tests/test_api.py tests/test_containerfile.py
elif [ $# -eq 0 ]; then
  echo "test.sh: the dependency floors are tested on Python 3.11 only (older releases have no wheels for $(python3 -V))" >&2
fi
exec .venv/bin/pytest -q "$@"
