#!/usr/bin/env bash
# Start a Docker engine for the container tests (tests/test_containers.py) on a Debian 12 machine
# where this runs as root and no image registry is reachable, and build the base image the
# Dockerfiles start FROM out of Debian packages: a stand-in for python:3.11-slim-bookworm (Debian's
# python3 3.11, pip, python-is-python3), trusting this machine's extra CA certificates so pip reaches
# the package index through a TLS-intercepting proxy.
#
#   bash .ci/container-engine.sh        # idempotent: an answering engine and an existing base are kept
#   kill -TERM "$(cat /var/lib/colam-engine/dockerd.pid)"   # stop the engine it started
#
# Adapted from shared/tools/container-engine.sh (measured there: ~80 s with the packages installed).
# Where a registry is reachable, none of this is needed: `docker pull python:3.11-slim-bookworm`.
set -euo pipefail

WORK=${COLAM_ENGINE_DIR:-/var/lib/colam-engine}
BASE=python:3.11-slim-bookworm
mkdir -p "$WORK"
LOG=$WORK/engine.log
: > "$LOG"

step() {  # step NAME CMD... : runs CMD in a subshell that stops at its first failing command
  local name=$1 began=$SECONDS status; shift
  # Not `CMD || ...`: bash turns errexit off for everything left of ||, subshells included.
  set +e; ( set -e; "$@" ) >>"$LOG" 2>&1; status=$?; set -e
  if [ "$status" != 0 ]; then
    echo "container-engine: $name failed; the last lines of $LOG:" >&2; tail -20 "$LOG" >&2; exit 1
  fi
  echo "container-engine: $name: $((SECONDS - began)) s"
}

install_packages() {
  command -v dockerd >/dev/null && command -v debootstrap >/dev/null && [ -x /usr/bin/docker ] && return 0
  apt-get update -q
  apt-get install -y -q --no-install-recommends docker.io debootstrap iptables
}

start_dockerd() {  # cgroups were mounted on the machines this ran on; dockerd needs them
  docker info >/dev/null 2>&1 && return 0
  mountpoint -q /sys/fs/cgroup || mount -t cgroup2 none /sys/fs/cgroup
  nohup dockerd --data-root "$WORK/docker-data" --storage-driver overlay2 >"$WORK/dockerd.log" 2>&1 &
  echo $! > "$WORK/dockerd.pid"
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && return 0; sleep 0.5; done
  echo "dockerd did not answer within 30 s; see $WORK/dockerd.log"; return 1
}

debian_base() {  # local/debian:bookworm from debootstrap (minbase), apt sources of this machine's mirror
  docker image inspect local/debian:bookworm >/dev/null 2>&1 && return 0
  local mirror rootfs=$WORK/rootfs
  mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  [ -n "$mirror" ] || mirror=$(awk '$1=="deb"{print $2; exit}' /etc/apt/sources.list)
  rm -rf "$rootfs"
  debootstrap --variant=minbase bookworm "$rootfs" "$mirror"
  rm -f "$rootfs"/var/cache/apt/archives/*.deb
  rm -rf "$rootfs"/var/lib/apt/lists/*; mkdir -p "$rootfs"/var/lib/apt/lists/partial
  printf 'deb %s bookworm main\ndeb %s bookworm-updates main\ndeb %s-security bookworm-security main\n' \
      "$mirror" "$mirror" "$mirror" > "$rootfs"/etc/apt/sources.list
  tar -C "$rootfs" -c . | docker import - local/debian:bookworm
  rm -rf "$rootfs"
}

python_base() {  # EXTERNALLY-MANAGED goes so that `pip install` as root works as in the official image
  docker image inspect "$BASE" >/dev/null 2>&1 && return 0
  local context=$WORK/python-base
  rm -rf "$context"; mkdir -p "$context/certs"
  cp /usr/local/share/ca-certificates/*.crt "$context/certs/" 2>/dev/null || true
  cat > "$context/Dockerfile" <<'DOCKERFILE'
FROM local/debian:bookworm
ENV LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip python-is-python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && rm -f /usr/lib/python3.11/EXTERNALLY-MANAGED
COPY certs/ /usr/local/share/ca-certificates/
RUN update-ca-certificates
CMD ["python3"]
DOCKERFILE
  DOCKER_BUILDKIT=1 /usr/bin/docker build -t "$BASE" "$context"
}

step "packages (docker.io, debootstrap)" install_packages
step "dockerd" start_dockerd
step "local/debian:bookworm" debian_base
step "$BASE (stand-in)" python_base
