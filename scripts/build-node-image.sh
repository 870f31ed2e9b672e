#!/usr/bin/env bash
# Build the LXD image of a test node that is a machine of its own, offline from
# Debian's packages, once:
#
#   bash scripts/build-node-image.sh           # -> LXD image vendetta/node-debian12
#   bash scripts/build-node-image.sh --force   # rebuild
#
# A Debian 12 minbase (debootstrap) with sshd and python3 (and python3-venv,
# iproute2) and nothing of vendetta, for tests of `node add` against a node
# that is not this machine (tests/support/node_machine.py launches it, with no
# network: its sshd is reached through an LXD proxy device on 127.0.0.1).
# minbase has no init: /sbin/init brings lo up, makes host keys once, and
# becomes sshd (which reaps what its sessions leave behind). A user `vdnode`
# exists besides root; the tests give both their key at launch.
#
# Runs as root after scripts/engine-lxd.sh. Cached: the image carries
# IMAGE_VERSION and is rebuilt only when that changes (~45 s for debootstrap
# from deb.debian.org, ~10 s to pack and import).
set -euo pipefail

IMAGE_ALIAS=vendetta/node-debian12
# Bump when what the image holds changes: an older import is replaced.
IMAGE_VERSION=1
SUITE=bookworm
PACKAGES=openssh-server,python3,python3-venv,iproute2
NODE_USER=vdnode
force=0

log() { printf 'build-node-image: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

for arg in "$@"; do
    case $arg in
        --force) force=1 ;;
        -h|--help) sed -n '2,6p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) die "unknown option: $arg (try --help)" ;;
    esac
done

[[ $(id -u) == 0 ]] || die "run as root"
timeout 10 lxc info >/dev/null 2>&1 || die "LXD does not answer: run scripts/engine-lxd.sh first"

if ((force == 0)) && lxc image info "$IMAGE_ALIAS" 2>/dev/null \
        | grep -q "vendetta_version: \"\?$IMAGE_VERSION\"\?\$"; then
    log "image $IMAGE_ALIAS present; --force rebuilds"
    exit 0
fi

if ! command -v debootstrap >/dev/null; then
    log "installing debootstrap"
    apt=(apt-get -o DPkg::Lock::Timeout=600)
    DEBIAN_FRONTEND=noninteractive "${apt[@]}" install -y --no-install-recommends debootstrap >/dev/null \
        || { "${apt[@]}" update >/dev/null && DEBIAN_FRONTEND=noninteractive \
            "${apt[@]}" install -y --no-install-recommends debootstrap >/dev/null; } \
        || die "apt-get install debootstrap failed"
fi

# The Debian mirror apt uses here (deb822 or one-line sources), else deb.debian.org.
mirror=$(grep -hoE 'https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list.d/*.sources \
    /etc/apt/sources.list 2>/dev/null | head -n1 | tr -d ' ' || true)
mirror=${mirror:-http://deb.debian.org/debian}

start=$SECONDS
work=$(mktemp -d /tmp/vd-node-image-XXXXXX)
trap 'rm -rf "$work"' EXIT
root=$work/rootfs

log "debootstrap --variant=minbase $SUITE from $mirror (with $PACKAGES)"
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$root" "$mirror" \
    >"$work/debootstrap.log" 2>&1 || { tail -n 30 "$work/debootstrap.log" >&2; die "debootstrap failed"; }
log "debootstrap done in $((SECONDS - start))s"

# Nothing of the build host's identity: keys are made at first boot.
rm -f "$root"/etc/ssh/ssh_host_*
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
chroot "$root" useradd --create-home --shell /bin/bash --password '*' "$NODE_USER"
mkdir -p "$root/root/.ssh" "$root/home/$NODE_USER/.ssh"
chmod 700 "$root/root/.ssh" "$root/home/$NODE_USER/.ssh"
chroot "$root" chown "$NODE_USER:$NODE_USER" "/home/$NODE_USER/.ssh"
cat >"$root/etc/ssh/sshd_config.d/vendetta-test.conf" <<'CONF'
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AllowTcpForwarding yes
AllowStreamLocalForwarding yes
StreamLocalBindUnlink yes
CONF
cat >"$root/sbin/init" <<'INIT'
#!/bin/sh
# PID 1 of the vendetta test node: loopback up (the LXD proxy device connects
# to 127.0.0.1:22), host keys once, then sshd in the foreground.
ip link set lo up
ssh-keygen -A >/dev/null
mkdir -p /run/sshd
chmod 0755 /run/sshd
exec /usr/sbin/sshd -D -e
INIT
chmod 0755 "$root/sbin/init"

cat >"$work/metadata.yaml" <<YAML
architecture: x86_64
creation_date: $(date +%s)
properties:
  description: vendetta test node (Debian 12 minbase, sshd, python3; no vendetta)
  os: debian
  release: $SUITE
  vendetta_version: "$IMAGE_VERSION"
YAML
tar -C "$work" -czf "$work/metadata.tar.gz" metadata.yaml
tar -C "$root" --numeric-owner -czf "$work/rootfs.tar.gz" .
lxc image delete "$IMAGE_ALIAS" >/dev/null 2>&1 || true
lxc image import "$work/metadata.tar.gz" "$work/rootfs.tar.gz" --alias "$IMAGE_ALIAS" >/dev/null
log "image $IMAGE_ALIAS imported ($(du -sh "$work/rootfs.tar.gz" | cut -f1) packed) in $((SECONDS - start))s"
