#!/usr/bin/env bash
# Build the LXD image of a test node that is a machine of its own, offline from
# Debian's packages, once:
#
#   bash scripts/build-node-image.sh             # -> LXD image vendetta/node-debian12
#   bash scripts/build-node-image.sh --systemd   # -> vendetta/node-debian12-systemd
#   bash scripts/build-node-image.sh --force     # rebuild
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
#
# --systemd: the same node, but systemd is PID 1 with logind and PAM sessions
# (libpam-systemd), so an SSH login gets a user manager and `loginctl
# enable-linger` keeps it running: the tests of the agent's `systemd --user`
# unit use it. No polkit: a user other than root cannot enable its own lingering
# (the tests of the fallback to a detached agent rely on that).
set -euo pipefail

IMAGE_ALIAS=vendetta/node-debian12
# Bump when what the image holds changes: an older import is replaced.
IMAGE_VERSION=1
SUITE=bookworm
PACKAGES=openssh-server,python3,python3-venv,iproute2
NODE_USER=vdnode
force=0
systemd=0

log() { printf 'build-node-image: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
# shellcheck source=scripts/debian-rootfs.sh
source "$(dirname "${BASH_SOURCE[0]}")/debian-rootfs.sh"

for arg in "$@"; do
    case $arg in
        --force) force=1 ;;
        --systemd) systemd=1 ;;
        -h|--help) sed -n '2,7p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) die "unknown option: $arg (try --help)" ;;
    esac
done

[[ $(id -u) == 0 ]] || die "run as root"
if ((systemd)); then
    IMAGE_ALIAS=vendetta/node-debian12-systemd
    PACKAGES=$PACKAGES,systemd,systemd-sysv,dbus,libpam-systemd
fi
timeout 10 lxc info >/dev/null 2>&1 || die "LXD does not answer: run scripts/engine-lxd.sh first"

if ((force == 0)) && lxc image info "$IMAGE_ALIAS" 2>/dev/null \
        | grep -q "vendetta_version: \"\?$IMAGE_VERSION\"\?\$"; then
    log "image $IMAGE_ALIAS present; --force rebuilds"
    exit 0
fi

start=$SECONDS
work=$(mktemp -d /tmp/vd-node-image-XXXXXX)
trap 'rm -rf "$work"' EXIT
root=$work/rootfs

debian_rootfs "$SUITE" "$PACKAGES" "$root"
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
if ((systemd)); then
    echo vd-node-systemd >"$root/etc/hostname"
    # Host keys are made at first boot, not baked into the image.
    mkdir -p "$root/etc/systemd/system/ssh.service.d"
    cat >"$root/etc/systemd/system/ssh.service.d/vendetta-keys.conf" <<'CONF'
[Service]
ExecStartPre=
ExecStartPre=/usr/bin/ssh-keygen -A
ExecStartPre=/usr/sbin/sshd -t
CONF
    # Nothing a container can do or needs.
    chroot "$root" systemctl mask systemd-binfmt.service >/dev/null 2>&1 || true
else
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
fi

cat >"$work/metadata.yaml" <<YAML
architecture: x86_64
creation_date: $(date +%s)
properties:
  description: vendetta test node$( ((systemd)) && echo ' with systemd') (Debian 12 minbase, sshd, python3; no vendetta)
  os: debian
  release: $SUITE
  vendetta_version: "$IMAGE_VERSION"
YAML
tar -C "$work" -czf "$work/metadata.tar.gz" metadata.yaml
tar -C "$root" --numeric-owner -czf "$work/rootfs.tar.gz" .
lxc image delete "$IMAGE_ALIAS" >/dev/null 2>&1 || true
lxc image import "$work/metadata.tar.gz" "$work/rootfs.tar.gz" --alias "$IMAGE_ALIAS" >/dev/null
log "image $IMAGE_ALIAS imported ($(du -sh "$work/rootfs.tar.gz" | cut -f1) packed) in $((SECONDS - start))s"
