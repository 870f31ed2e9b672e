# Sourced by the image scripts: a Debian minbase root file system from Debian's
# packages (debootstrap from the mirror apt uses here), without apt's caches or
# SSH host keys. Needs the caller's `log` and `die`.

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
