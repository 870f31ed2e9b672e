#!/usr/bin/env bash
# Install and start libvirt + QEMU for the qemu provider (Debian 12, root, no
# systemd; see shared ENGINES.md). Idempotent: does nothing already done.
#
#   bash scripts/engine-qemu.sh          # packages, /dev/kvm, virtlogd+libvirtd, libvirt-python
#
# Then build the guest image once: bash scripts/build-guest-image.sh
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
URI=qemu:///system
WAIT_SECONDS=60
LOG_DIR=/var/log/vendetta
PACKAGES=(qemu-system-x86 qemu-utils libvirt-daemon-system libvirt-clients libvirt-dev pkg-config)

log() { printf 'engine-qemu: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ $(id -u) == 0 ]] || die "run as root (installs packages, starts libvirtd)"

install_packages() {
    local missing=() pkg
    for pkg in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' \
            || missing+=("$pkg")
    done
    if ((${#missing[@]} == 0)); then
        log "packages present"
        return 0
    fi
    log "installing ${missing[*]}"
    # Wait for the dpkg lock instead of failing when another install runs.
    local apt=(apt-get -o DPkg::Lock::Timeout=600)
    DEBIAN_FRONTEND=noninteractive "${apt[@]}" install -y --no-install-recommends "${missing[@]}" >/dev/null \
        || { "${apt[@]}" update >/dev/null && DEBIAN_FRONTEND=noninteractive \
            "${apt[@]}" install -y --no-install-recommends "${missing[@]}" >/dev/null; } \
        || die "apt-get install ${missing[*]} failed"
}

fix_kvm() {
    # Debian's udev rule gives /dev/kvm to group kvm, 0660; without udev it is
    # root 0600 and libvirt re-probes QEMU on every call (~50 s per create).
    if [[ -c /dev/kvm ]]; then
        getent group kvm >/dev/null || groupadd --system kvm
        chgrp kvm /dev/kvm
        chmod 660 /dev/kvm
        log "/dev/kvm: group kvm, mode 660"
    else
        log "/dev/kvm absent: guests will run under TCG emulation (slower)"
    fi
}

libvirt_answers() { timeout 10 virsh -c "$URI" version >/dev/null 2>&1; }

LIBVIRTD_CONF=/etc/libvirt/libvirtd.conf
# Members of the libvirt group reach qemu:///system without polkit (no D-Bus
# here; see shared ENGINES.md): a node user who is not root runs guests.
GROUP_ACCESS=(
    'unix_sock_group = "libvirt"'
    'unix_sock_rw_perms = "0770"'
    'auth_unix_rw = "none"'
)

configure_group_access() {
    getent group libvirt >/dev/null || groupadd --system libvirt
    local line key changed=0
    for line in "${GROUP_ACCESS[@]}"; do
        grep -qxF "$line" "$LIBVIRTD_CONF" 2>/dev/null && continue
        key=${line%% *}
        # Drop an earlier value of the same setting (commented-out defaults stay).
        sed -i "/^[[:space:]]*${key}[[:space:]]*=/d" "$LIBVIRTD_CONF"
        printf '%s\n' "$line" >>"$LIBVIRTD_CONF"
        changed=1
    done
    ((changed)) && log "$LIBVIRTD_CONF: the libvirt group may use $URI (no polkit)"
    return 0
}

# A libvirtd started before that setting still wants polkit: restart it once
# (running guests keep running; libvirtd finds them again).
restart_if_stale() {
    local sock=/run/libvirt/libvirt-sock pid
    [[ -S $sock ]] || return 0
    [[ $(stat -c %G "$sock") == libvirt ]] && return 0
    pid=$(pgrep -x libvirtd) || return 0
    log "restarting libvirtd (pid $pid) to apply the group access"
    kill -TERM "$pid"
    local deadline=$((SECONDS + 30))
    while kill -0 "$pid" 2>/dev/null; do
        ((SECONDS < deadline)) || { kill -KILL "$pid" 2>/dev/null || true; break; }
        sleep 0.2
    done
}

start_daemons() {
    if libvirt_answers; then
        log "libvirtd already answering on $URI"
        return 0
    fi
    mkdir -p "$LOG_DIR" /run/libvirt
    if ! pgrep -x virtlogd >/dev/null; then
        log "starting virtlogd (log: $LOG_DIR/virtlogd.log)"
        setsid nohup virtlogd </dev/null >"$LOG_DIR/virtlogd.log" 2>&1 &
    fi
    if ! pgrep -x libvirtd >/dev/null; then
        log "starting libvirtd (log: $LOG_DIR/libvirtd.log)"
        setsid nohup libvirtd </dev/null >"$LOG_DIR/libvirtd.log" 2>&1 &
    fi
    local deadline=$((SECONDS + WAIT_SECONDS))
    until libvirt_answers; do
        if ((SECONDS >= deadline)); then
            log "libvirtd did not answer within ${WAIT_SECONDS}s; last lines of $LOG_DIR/libvirtd.log:"
            tail -n 30 "$LOG_DIR/libvirtd.log" >&2 || true
            exit 1
        fi
        sleep 0.5
    done
    log "libvirtd ready: $(virsh -c "$URI" version 2>/dev/null | grep -i 'running hypervisor' || true)"
}

install_python_binding() {
    [[ -x $VENV/bin/python ]] || { log "no venv at $VENV: skipping libvirt-python (run scripts/setup.sh)"; return 0; }
    if "$VENV/bin/python" -c 'import libvirt' >/dev/null 2>&1; then
        log "libvirt-python present in $VENV"
        return 0
    fi
    log "building libvirt-python into $VENV (compiles against libvirt-dev)"
    local start=$SECONDS
    "$VENV/bin/python" -m pip install --quiet libvirt-python || die "pip install libvirt-python failed"
    log "libvirt-python installed in $((SECONDS - start))s"
}

install_packages
fix_kvm
configure_group_access
restart_if_stale
start_daemons
install_python_binding
log "done"
