#!/usr/bin/env bash
# Build the Debian test image of workspaces, offline from Debian's packages, once:
#
#   bash scripts/build-test-image.sh           # -> Docker vendetta/debian12:latest, LXD vendetta/debian12
#   bash scripts/build-test-image.sh --force   # rebuild
#
# What people develop in has glibc, bash and the usual tools; busybox is not
# that. A Debian 12 minbase (debootstrap) with bash, coreutils, git, rsync,
# openssh-client, openssh-sftp-server, python3, curl and iproute2, for the
# editor tests (`ssh -L/-D/-R`, sftp, scp, rsync, git over `NAME.vendetta`).
# The same root filesystem becomes a Docker image (`docker import`) and an LXD
# image; LXD runs /sbin/init (a tiny one: loopback up, then idle, reaping).
#
# Runs as root after scripts/engines.sh start. Cached: the root filesystem is
# kept in /var/cache/vendetta (one debootstrap, ~1 min; scripts/debian-rootfs.sh,
# which the QEMU guest image shares); each engine's copy carries IMAGE_VERSION
# and is replaced only when that changes.
set -euo pipefail

NAME=vendetta/debian12
force=0

log() { printf 'build-test-image: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
# shellcheck source=scripts/debian-rootfs.sh
source "$(dirname "${BASH_SOURCE[0]}")/debian-rootfs.sh"
# What the image holds is the cached root filesystem: bump TEST_ROOTFS_VERSION
# there, and the cache and older imports are replaced.
IMAGE_VERSION=$TEST_ROOTFS_VERSION
SUITE=$TEST_ROOTFS_SUITE
CACHE=$TEST_ROOTFS_CACHE

for arg in "$@"; do
    case $arg in
        --force) force=1 ;;
        -h|--help) sed -n '2,6p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) die "unknown option: $arg (try --help)" ;;
    esac
done
[[ $(id -u) == 0 ]] || die "run as root"

built=0
build_rootfs() {
    # Once per run, also with --force (the Docker and the LXD image share it).
    if ((force == 1 && built == 0)); then
        test_rootfs --force
    else
        test_rootfs
    fi
    built=1
}

docker_image() {
    command -v docker >/dev/null && timeout 10 docker info >/dev/null 2>&1 || {
        log "Docker does not answer: no Docker image"; return 0; }
    local have
    have=$(docker image inspect -f '{{index .Config.Labels "vendetta.test-image"}}' "$NAME:latest" 2>/dev/null || true)
    if ((force == 0)) && [[ $have == "$IMAGE_VERSION" ]]; then
        log "Docker image $NAME:latest present"
        return 0
    fi
    build_rootfs
    docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change "LABEL vendetta.test-image=$IMAGE_VERSION" \
        --change 'CMD ["/bin/bash"]' \
        "$CACHE" "$NAME:latest" >/dev/null
    local out
    out=$(docker run --rm "$NAME:latest" bash -c 'echo ok' 2>&1) || die "docker run $NAME failed: $out"
    [[ $out == ok ]] || die "docker run $NAME printed '$out'"
    log "Docker image $NAME:latest built and runs"
}

lxd_image() {
    command -v lxc >/dev/null && timeout 10 lxc info >/dev/null 2>&1 || {
        log "LXD does not answer: no LXD image"; return 0; }
    if ((force == 0)) && lxc image info "$NAME" 2>/dev/null \
            | grep -q "vendetta_version: \"\?$IMAGE_VERSION\"\?\$"; then
        log "LXD image $NAME present"
        return 0
    fi
    build_rootfs
    local work
    work=$(mktemp -d /tmp/vd-test-image-XXXXXX)
    # shellcheck disable=SC2064
    trap "rm -rf '$work'" RETURN
    cat >"$work/metadata.yaml" <<YAML
architecture: x86_64
creation_date: $(date +%s)
properties:
  description: vendetta test image (Debian 12 minbase, bash, git, rsync, openssh-client, sftp-server, python3)
  os: debian
  release: $SUITE
  vendetta_version: "$IMAGE_VERSION"
YAML
    tar -C "$work" -czf "$work/metadata.tar.gz" metadata.yaml
    lxc image delete "$NAME" >/dev/null 2>&1 || true
    lxc image import "$work/metadata.tar.gz" "$CACHE" --alias "$NAME" >/dev/null
    log "LXD image $NAME imported"
}

docker_image
lxd_image
