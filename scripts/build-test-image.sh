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
# kept in /var/cache/vendetta (one debootstrap, ~1 min); each engine's copy
# carries IMAGE_VERSION and is replaced only when that changes.
set -euo pipefail

NAME=vendetta/debian12
# Bump when what the image holds changes: the cache and older imports are replaced.
IMAGE_VERSION=2
SUITE=bookworm
PACKAGES=bash,coreutils,git,rsync,openssh-client,openssh-sftp-server,python3,curl,iproute2,ca-certificates
CACHE=/var/cache/vendetta/test-image-$SUITE-v$IMAGE_VERSION.tar.gz
force=0

log() { printf 'build-test-image: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
# shellcheck source=scripts/debian-rootfs.sh
source "$(dirname "${BASH_SOURCE[0]}")/debian-rootfs.sh"

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
    if [[ -s $CACHE ]] && ((force == 0 || built)); then
        return 0
    fi
    built=1
    local work root start=$SECONDS
    work=$(mktemp -d /tmp/vd-test-image-XXXXXX)
    # shellcheck disable=SC2064  # expand $work now
    trap "rm -rf '$work'" RETURN
    root=$work/rootfs
    debian_rootfs "$SUITE" "$PACKAGES" "$root"
    # debootstrap writes no /etc/hosts (the installer does): "localhost" must resolve
    # inside (LXD keeps the image's; Docker writes its own).
    printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' >"$root/etc/hosts"
    # A user who is not root, as dev images have (uid 1000).
    chroot "$root" useradd --create-home --shell /bin/bash --uid 1000 dev
    cat >"$root/sbin/init" <<'INIT'
#!/bin/bash
# PID 1 of the vendetta test image under LXD: loopback up (dev servers listen
# on it), then idle; bash reaps whatever is orphaned to it. SIGPWR is LXD's
# graceful stop.
ip link set lo up 2>/dev/null
trap 'exit 0' PWR TERM INT
while :; do sleep 3600 & wait $!; done
INIT
    chmod 0755 "$root/sbin/init"
    mkdir -p "$(dirname "$CACHE")"
    tar -C "$root" --numeric-owner -czf "$CACHE.tmp" .
    mv "$CACHE.tmp" "$CACHE"
    find "$(dirname "$CACHE")" -maxdepth 1 -name "test-image-$SUITE-v*.tar.gz" ! -path "$CACHE" -delete
    log "root filesystem cached at $CACHE ($(du -sh "$CACHE" | cut -f1)) in $((SECONDS - start))s"
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
