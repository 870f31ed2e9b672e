#!/usr/bin/env bash
# Start, stop and report the real engines the integration tests need.
#
#   scripts/engines.sh start   # dockerd (if not answering), sshd prerequisites, busybox image,
#                              # LXD (+ the test node image), libvirt, guest image, the test node users
#   scripts/engines.sh status  # what is running / present
#   scripts/engines.sh stop    # stop the dockerd that *this script* started
#
# Runs as root, without systemd (see shared ENGINES.md). Idempotent: `start`
# does nothing that is already done, so it is fast on a warm machine.
set -euo pipefail

STATE_DIR=/run/vendetta-engines
DOCKERD_PID_FILE=$STATE_DIR/dockerd.pid
DOCKERD_LOG=/var/log/vendetta-dockerd.log
DOCKERD_WAIT_SECONDS=60
SSHD=/usr/sbin/sshd
BUSYBOX=/bin/busybox
IMAGE=vendetta/busybox:latest
# Applets the tests and demos rely on; the image gets every applet busybox has.
REQUIRED_APPLETS=(sh sleep echo cat ls true false env printf kill ps wc seq yes head tail
                  date grep sed awk nc hostname id mkdir rm touch)

log() { printf 'engines: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

docker_answers() { timeout 10 docker version >/dev/null 2>&1; }

# Pid of the dockerd this script started, if it is still that dockerd.
our_dockerd_pid() {
    local pid
    [[ -f $DOCKERD_PID_FILE ]] || return 1
    pid=$(<"$DOCKERD_PID_FILE")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == dockerd ]] || return 1
    printf '%s\n' "$pid"
}

start_dockerd() {
    if docker_answers; then
        log "dockerd already answering"
        return 0
    fi
    command -v dockerd >/dev/null || die "dockerd not found: install docker.io (scripts/setup.sh)"
    command -v docker >/dev/null || die "docker CLI not found: install docker.io (scripts/setup.sh)"
    local pid
    if pid=$(our_dockerd_pid); then
        log "dockerd (pid $pid) is running but not answering yet; waiting for it"
    else
        mkdir -p "$STATE_DIR"
        log "starting dockerd (log: $DOCKERD_LOG)"
        # setsid + nohup + closed stdin: dockerd outlives this script and holds
        # none of its file descriptors (a caller capturing our output won't hang).
        setsid nohup dockerd --storage-driver=overlay2 </dev/null >"$DOCKERD_LOG" 2>&1 &
        pid=$!
        printf '%s\n' "$pid" >"$DOCKERD_PID_FILE"
    fi
    local deadline=$((SECONDS + DOCKERD_WAIT_SECONDS))
    until docker_answers; do
        if ! kill -0 "$pid" 2>/dev/null; then
            rm -f "$DOCKERD_PID_FILE"
            log "dockerd exited; last lines of $DOCKERD_LOG:"
            tail -n 30 "$DOCKERD_LOG" >&2 || true
            exit 1
        fi
        if ((SECONDS >= deadline)); then
            log "dockerd did not answer within ${DOCKERD_WAIT_SECONDS}s; last lines of $DOCKERD_LOG:"
            tail -n 30 "$DOCKERD_LOG" >&2 || true
            exit 1
        fi
        sleep 0.5
    done
    # dockerd writes its own pid file; if the daemon answering is not ours
    # (someone started one concurrently), don't claim it: `stop` must not kill it.
    if [[ $(cat /var/run/docker.pid 2>/dev/null) != "$pid" ]]; then
        rm -f "$DOCKERD_PID_FILE"
        log "dockerd ready (started elsewhere)"
        return 0
    fi
    log "dockerd ready (pid $pid)"
}

prepare_sshd() {
    [[ -x $SSHD ]] || die "$SSHD not found: install openssh-server (scripts/setup.sh)"
    # sshd refuses to start without its privilege separation directory.
    mkdir -p /run/sshd
    chmod 0755 /run/sshd
}

build_busybox_image() {
    if docker image inspect "$IMAGE" >/dev/null 2>&1; then
        log "image $IMAGE present"
        return 0
    fi
    [[ -x $BUSYBOX ]] || die "$BUSYBOX not found: install busybox-static (scripts/setup.sh)"
    log "building $IMAGE from $BUSYBOX"
    local root applet
    root=$(mktemp -d)
    # shellcheck disable=SC2064  # expand $root now
    trap "rm -rf '$root'" RETURN
    mkdir -p "$root/bin" "$root/etc" "$root/root" "$root/tmp" "$root/usr"
    chmod 1777 "$root/tmp"
    cp "$BUSYBOX" "$root/bin/busybox"
    local -A applets=()
    while read -r applet; do
        [[ -n $applet && $applet != busybox ]] || continue
        applets[$applet]=1
        ln -s busybox "$root/bin/$applet"
    done < <("$BUSYBOX" --list)
    for applet in "${REQUIRED_APPLETS[@]}"; do
        [[ -n ${applets[$applet]:-} ]] || die "$BUSYBOX lacks the applet '$applet'"
    done
    ln -s ../bin "$root/usr/bin"    # so /usr/bin/env and friends resolve
    printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
    printf 'root:x:0:\n' >"$root/etc/group"
    tar -C "$root" -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["/bin/sh"]' \
        - "$IMAGE" >/dev/null
    local out
    out=$(docker run --rm "$IMAGE" echo ok 2>&1) || die "docker run $IMAGE failed: $out"
    [[ $out == ok ]] || die "docker run $IMAGE echo ok printed '$out'"
    log "image $IMAGE built and runs"
}

cmd_start() {
    start_dockerd
    prepare_sshd
    build_busybox_image
    local here
    here=$(dirname "${BASH_SOURCE[0]}")
    bash "$here/engine-lxd.sh"
    bash "$here/build-node-image.sh"
    bash "$here/build-node-image.sh" --systemd
    bash "$here/engine-qemu.sh"
    bash "$here/build-guest-image.sh"
    # After the engines: their groups exist, the node users join them.
    bash "$here/test-users.sh"
}

cmd_stop() {
    local pid
    if ! pid=$(our_dockerd_pid); then
        rm -f "$DOCKERD_PID_FILE"
        log "no dockerd started by this script is running"
        return 0
    fi
    log "stopping dockerd (pid $pid)"
    kill -TERM "$pid"
    local deadline=$((SECONDS + 30))
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            log "dockerd did not stop within 30s; sending SIGKILL"
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.2
    done
    rm -f "$DOCKERD_PID_FILE"
    log "dockerd stopped"
}

cmd_status() {
    local pid
    if docker_answers; then
        if pid=$(our_dockerd_pid); then
            echo "dockerd: running (pid $pid, started by engines.sh, log $DOCKERD_LOG)"
        else
            echo "dockerd: running (not started by engines.sh)"
        fi
        echo "docker server: $(docker version --format '{{.Server.Version}}' 2>/dev/null || echo '?')"
        if docker image inspect "$IMAGE" >/dev/null 2>&1; then
            echo "image $IMAGE: present"
        else
            echo "image $IMAGE: missing"
        fi
    else
        echo "dockerd: not answering"
    fi
    if [[ -x $SSHD ]]; then
        echo "sshd: $SSHD present$([[ -d /run/sshd ]] && echo ', /run/sshd ready' || echo ', /run/sshd missing')"
    else
        echo "sshd: $SSHD missing"
    fi
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
