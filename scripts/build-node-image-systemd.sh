#!/usr/bin/env bash
# Build the LXD image of a test node that boots systemd, offline from Debian's packages, once:
#
#   bash scripts/build-node-image-systemd.sh           # -> LXD image vendetta/node-debian12-systemd
#   bash scripts/build-node-image-systemd.sh --force   # rebuild
#
# As scripts/build-node-image.sh (Debian 12 minbase, sshd, python3, nothing of
# vendetta, the user vdnode), but systemd is PID 1 with logind and PAM sessions
# (libpam-systemd), so an SSH login gets a user manager and `loginctl
# enable-linger` keeps it running: the tests of the agent's `systemd --user`
# unit use it. No polkit: a user other than root cannot enable its own lingering
# (the tests of the fallback to a detached agent rely on that).
set -euo pipefail

IMAGE_ALIAS=vendetta/node-debian12-systemd
# Bump when what the image holds changes: an older import is replaced.
IMAGE_VERSION=1
SUITE=bookworm
PACKAGES=openssh-server,python3,python3-venv,iproute2,systemd,systemd-sysv,dbus,libpam-systemd
NODE_USER=vdnode
force=0

log() { printf 'build-node-image-systemd: %s\n' "$*" >&2; }
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
command -v debootstrap >/dev/null || die "debootstrap is missing: run scripts/build-node-image.sh first"

if ((force == 0)) && lxc image info "$IMAGE_ALIAS" 2>/dev/null \
        | grep -q "vendetta_version: \"\?$IMAGE_VERSION\"\?\$"; then
    log "image $IMAGE_ALIAS present; --force rebuilds"
    exit 0
fi

mirror=$(grep -hoE 'https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list.d/*.sources \
    /etc/apt/sources.list 2>/dev/null | head -n1 | tr -d ' ' || true)
mirror=${mirror:-http://deb.debian.org/debian}

start=$SECONDS
work=$(mktemp -d /tmp/vd-node-image-sd-XXXXXX)
trap 'rm -rf "$work"' EXIT
root=$work/rootfs

log "debootstrap --variant=minbase $SUITE from $mirror (with $PACKAGES)"
debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$root" "$mirror" \
    >"$work/debootstrap.log" 2>&1 || { tail -n 30 "$work/debootstrap.log" >&2; die "debootstrap failed"; }
log "debootstrap done in $((SECONDS - start))s"

rm -f "$root"/etc/ssh/ssh_host_*
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
chroot "$root" useradd --create-home --shell /bin/bash --password '*' "$NODE_USER"
mkdir -p "$root/root/.ssh" "$root/home/$NODE_USER/.ssh"
chmod 700 "$root/root/.ssh" "$root/home/$NODE_USER/.ssh"
chroot "$root" chown "$NODE_USER:$NODE_USER" "/home/$NODE_USER/.ssh"
echo vd-node-systemd >"$root/etc/hostname"
cat >"$root/etc/ssh/sshd_config.d/vendetta-test.conf" <<'CONF'
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
AllowTcpForwarding yes
AllowStreamLocalForwarding yes
StreamLocalBindUnlink yes
CONF
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

cat >"$work/metadata.yaml" <<YAML
architecture: x86_64
creation_date: $(date +%s)
properties:
  description: vendetta test node with systemd (Debian 12 minbase, sshd, python3; no vendetta)
  os: debian
  release: $SUITE
  vendetta_version: "$IMAGE_VERSION"
YAML
tar -C "$work" -czf "$work/metadata.tar.gz" metadata.yaml
tar -C "$root" --numeric-owner -czf "$work/rootfs.tar.gz" .
lxc image delete "$IMAGE_ALIAS" >/dev/null 2>&1 || true
lxc image import "$work/metadata.tar.gz" "$work/rootfs.tar.gz" --alias "$IMAGE_ALIAS" >/dev/null
log "image $IMAGE_ALIAS imported ($(du -sh "$work/rootfs.tar.gz" | cut -f1) packed) in $((SECONDS - start))s"
