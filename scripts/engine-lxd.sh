#!/usr/bin/env bash
# Make LXD usable for vendetta on this node, without systemd:
#
#   scripts/engine-lxd.sh
#
# installs lxd if missing, starts `lxd --group lxd` if nothing answers, runs a
# preseed (a `dir` storage pool named `default`, the default profile's root disk
# on it, no network) if the pool is missing, and imports the offline test image
# `vendetta/busybox` (busybox init + Debian's busybox-static) if it is missing,
# and lets root map node users' ids into containers (/etc/subuid, /etc/subgid).
# Runs as root. Idempotent: a warm machine takes about a second.
set -euo pipefail

LXD_LOG=/var/log/vendetta-lxd.log
LXD_WAIT_SECONDS=60
IMAGE_ALIAS=vendetta/busybox
BUSYBOX=/bin/busybox

log() { printf 'engine-lxd: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ $(id -u) == 0 ]] || die "run as root"

lxd_answers() { timeout 10 lxc info >/dev/null 2>&1; }

install_packages() {
    local missing=()
    command -v lxd >/dev/null || missing+=(lxd)
    [[ -x $BUSYBOX ]] || missing+=(busybox-static)
    if ((${#missing[@]})); then
        log "installing ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >&2
    else
        log "lxd $(lxd --version) and busybox-static installed"
    fi
}

start_lxd() {
    if lxd_answers; then
        log "lxd already answering"
        return 0
    fi
    getent group lxd >/dev/null || groupadd --system lxd
    if pgrep -x lxd >/dev/null; then
        log "an lxd process exists but does not answer yet; waiting for it"
    else
        log "starting lxd --group lxd (log: $LXD_LOG)"
        # setsid + nohup + closed stdin: lxd outlives this script and holds none of its fds.
        setsid nohup lxd --group lxd </dev/null >"$LXD_LOG" 2>&1 &
    fi
    if ! lxd waitready --timeout "$LXD_WAIT_SECONDS"; then
        log "lxd did not become ready within ${LXD_WAIT_SECONDS}s; last lines of $LXD_LOG:"
        tail -n 30 "$LXD_LOG" >&2 || true
        exit 1
    fi
    log "lxd ready"
}

initialise_lxd() {
    if lxc storage show default >/dev/null 2>&1; then
        log "storage pool default present"
        return 0
    fi
    log "initialising lxd: dir storage pool 'default', default profile root disk on it, no network"
    lxd init --preseed <<'YAML'
storage_pools:
- name: default
  driver: dir
profiles:
- name: default
  devices:
    root:
      path: /
      pool: default
      type: disk
YAML
}

# Bump when the image's content changes: an older import is replaced.
IMAGE_VERSION=2

import_image() {
    if lxc image info "$IMAGE_ALIAS" 2>/dev/null | grep -q "vendetta_version: \"\?$IMAGE_VERSION\"\?\$"; then
        log "image $IMAGE_ALIAS present"
        return 0
    fi
    lxc image delete "$IMAGE_ALIAS" >/dev/null 2>&1 || true
    log "building image $IMAGE_ALIAS from $BUSYBOX"
    local work root applet
    work=$(mktemp -d)
    # shellcheck disable=SC2064  # expand $work now
    trap "rm -rf '$work'" RETURN
    root=$work/rootfs
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,root,tmp,var/log,run,proc,sys,dev}
    chmod 1777 "$root/tmp"
    cp "$BUSYBOX" "$root/bin/busybox"
    for applet in $("$BUSYBOX" --list); do
        [[ $applet == busybox || -e $root/bin/$applet ]] || ln -s busybox "$root/bin/$applet"
    done
    ln -sf ../bin/busybox "$root/sbin/init"
    printf '%s\n' 'root:x:0:0:root:/root:/bin/sh' >"$root/etc/passwd"
    printf '%s\n' 'root:x:0:' >"$root/etc/group"
    printf '%s\n' 'PATH=/bin:/sbin:/usr/bin:/usr/sbin' >"$root/etc/environment"
    # busybox init brings up loopback (services listen on it; real distros do
    # this too); one idle respawned process keeps it calm. SIGPWR (LXD's
    # graceful stop) is mapped by busybox init to `shutdown` actions.
    cat >"$root/etc/inittab" <<'INITTAB'
::sysinit:/bin/ip link set lo up
::respawn:/bin/sleep 3600
::shutdown:/bin/true
INITTAB
    cat >"$work/metadata.yaml" <<YAML
architecture: x86_64
creation_date: $(date +%s)
properties:
  description: vendetta test image (busybox init, Debian busybox-static)
  os: busybox
  vendetta_version: "$IMAGE_VERSION"
  release: "$("$BUSYBOX" | head -n1 | awk '{print $2}')"
YAML
    tar -C "$work" -czf "$work/metadata.tar.gz" metadata.yaml
    tar -C "$root" --numeric-owner -czf "$work/rootfs.tar.gz" .
    lxc image import "$work/metadata.tar.gz" "$work/rootfs.tar.gz" --alias "$IMAGE_ALIAS" >&2
    log "image $IMAGE_ALIAS imported"
}

# A workspace's source is mounted with its owner's uid/gid mapped to the user
# inside (raw.idmap, providers/lxd/source.py); newuidmap lets root map only the
# host ids these files give it. Root (a root agent) and regular users' ids
# (1000-65535, whoever the node user is). Each range is under 65536 ids, so LXD
# does not take it for the containers' default map (it uses root:100000:...).
allow_id_maps() {
    local file line
    for file in /etc/subuid /etc/subgid; do
        for line in root:0:1 root:1000:64536; do
            grep -qx "$line" "$file" 2>/dev/null || printf '%s\n' "$line" >>"$file"
        done
    done
    log "root may map uid/gid 0 and 1000-65535 into containers (workspace sources)"
}

smoke_test() {
    local name out
    name=vd-engine-check-$$
    lxc delete --force "$name" >/dev/null 2>&1 || true
    if ! lxc launch "$IMAGE_ALIAS" "$name" >/dev/null 2>&1; then
        die "cannot launch a container from $IMAGE_ALIAS (see $LXD_LOG and \`lxc info --show-log $name\`)"
    fi
    out=$(lxc exec "$name" -- echo ok 2>&1) || true
    lxc delete --force "$name" >/dev/null 2>&1 || true
    [[ $out == ok ]] || die "lxc exec in a $IMAGE_ALIAS container failed: $out"
    log "a $IMAGE_ALIAS container launches and lxc exec works"
}

install_packages
start_lxd
initialise_lxd
import_image
allow_id_maps
smoke_test
log "ready"
