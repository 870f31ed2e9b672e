# Sourced by the image scripts: a Debian minbase root file system from Debian's
# packages (debootstrap from the mirror apt uses here), without apt's caches or
# SSH host keys. Needs the caller's `log` and `die`.

# The test root filesystem: what people develop in (glibc, bash, the usual
# tools) and what editors' tools need inside (`ssh -L/-D/-R`, sftp, scp, rsync,
# git). build-test-image.sh makes the Docker and LXD test images of it,
# build-guest-image.sh the QEMU guest's root. Kept as a tarball: one
# debootstrap (~1 min) for all. Bump the version when what it holds changes:
# the cache and the test images are replaced, and the guest image is rebuilt.
TEST_ROOTFS_SUITE=bookworm
TEST_ROOTFS_VERSION=2
TEST_ROOTFS_PACKAGES=bash,coreutils,git,rsync,openssh-client,openssh-sftp-server,python3,curl,iproute2,ca-certificates
TEST_ROOTFS_CACHE=/var/cache/vendetta/test-image-$TEST_ROOTFS_SUITE-v$TEST_ROOTFS_VERSION.tar.gz

# debian_rootfs SUITE PACKAGES ROOT: debootstrap into ROOT (its log beside it).
debian_rootfs() {
    local suite=$1 packages=$2 root=$3 mirror start=$SECONDS
    if ! command -v debootstrap >/dev/null; then
        log "installing debootstrap"
        local apt=(apt-get -o DPkg::Lock::Timeout=600)
        DEBIAN_FRONTEND=noninteractive "${apt[@]}" install -y --no-install-recommends debootstrap >/dev/null \
            || { "${apt[@]}" update >/dev/null && DEBIAN_FRONTEND=noninteractive \
                "${apt[@]}" install -y --no-install-recommends debootstrap >/dev/null; } \
            || die "apt-get install debootstrap failed"
    fi
    # The Debian mirror apt uses here (deb822 or one-line sources), else deb.debian.org.
    mirror=$(grep -hoE 'https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list.d/*.sources \
        /etc/apt/sources.list 2>/dev/null | head -n1 | tr -d ' ' || true)
    mirror=${mirror:-http://deb.debian.org/debian}
    log "debootstrap --variant=minbase $suite from $mirror (with $packages)"
    debootstrap --variant=minbase --include="$packages" "$suite" "$root" "$mirror" \
        >"$root.debootstrap.log" 2>&1 || { tail -n 30 "$root.debootstrap.log" >&2; die "debootstrap failed"; }
    log "debootstrap done in $((SECONDS - start))s"
    # Nothing of the build host's identity (keys are made at first boot), no caches.
    rm -f "$root"/etc/ssh/ssh_host_*
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
}

# test_rootfs [--force]: make $TEST_ROOTFS_CACHE unless it is there (--force: again).
# Under a lock: the guest and the test image scripts may ask at the same time.
test_rootfs() {
    local force=${1:-} lock rootfs_tmp root start=$SECONDS
    mkdir -p "$(dirname "$TEST_ROOTFS_CACHE")"
    exec {lock}<"$(dirname "$TEST_ROOTFS_CACHE")"
    flock "$lock"
    if [[ -s $TEST_ROOTFS_CACHE && $force != --force ]]; then
        exec {lock}>&-
        return 0
    fi
    # Beside the cache, not in /tmp: a build cut short (die exits) leaves it for the
    # next one to remove, under this lock. (Named apart from the callers' $work,
    # which their EXIT traps remove.)
    rootfs_tmp=$TEST_ROOTFS_CACHE.work
    rm -rf "$rootfs_tmp" && mkdir -p "$rootfs_tmp"
    root=$rootfs_tmp/rootfs
    debian_rootfs "$TEST_ROOTFS_SUITE" "$TEST_ROOTFS_PACKAGES" "$root"
    # debootstrap writes no /etc/hosts (the installer does): "localhost" must resolve
    # inside (LXD and the QEMU guest keep the image's; Docker writes its own).
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
    tar -C "$root" --numeric-owner -czf "$TEST_ROOTFS_CACHE.tmp" .
    mv "$TEST_ROOTFS_CACHE.tmp" "$TEST_ROOTFS_CACHE"
    rm -rf "$rootfs_tmp"
    find "$(dirname "$TEST_ROOTFS_CACHE")" -maxdepth 1 -name "test-image-$TEST_ROOTFS_SUITE-v*.tar.gz" \
        ! -path "$TEST_ROOTFS_CACHE" -delete
    log "root filesystem cached at $TEST_ROOTFS_CACHE ($(du -sh "$TEST_ROOTFS_CACHE" | cut -f1)) in $((SECONDS - start))s"
    exec {lock}>&-
}
