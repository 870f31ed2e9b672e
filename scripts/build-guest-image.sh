#!/usr/bin/env bash
# Build the qemu provider's guest image, offline from Debian packages, once.
#
#   bash scripts/build-guest-image.sh            # -> $IMAGE_DIR/debian-12/{vmlinuz,initrd.img,rootfs.qcow2}
#   bash scripts/build-guest-image.sh --force    # rebuild even while guests use it (a new
#                                                # version refuses then: overlays sit on rootfs.qcow2)
#
# Why this approach ("option A" of shared ENGINES.md): the Debian 12 minbase
# root filesystem of the Docker/LXD test image (scripts/debian-rootfs.sh: bash,
# coreutils, python3, git, rsync, openssh-client, sftp-server, curl, iproute2;
# one debootstrap, cached in /var/cache/vendetta) plus Debian's qemu-guest-agent
# binary (copied with the shared libraries ldd names), busybox only for the few
# commands minbase lacks (poweroff, ps, ...), and our own /sbin/init instead of
# systemd, on an ext4 root, booted with the Debian cloud kernel and a tiny
# busybox initramfs that loads the virtio modules and switch_roots to /dev/vda.
# No systemd, no apt inside a chroot: the guest agent answers a few seconds
# after boot instead of ~19 s for a systemd Debian under TCG. It is a real
# guest: its own kernel, its own disk (a per-workspace qcow2 overlay), commands
# run by the guest agent with output and exit code, and editors' tools inside
# as in the Docker and LXD test images. Trade-off: no services of Debian's
# (no sshd, cron or udev) start; only what init below starts runs.
#
# In the guest, /sbin/init (PID 1) wires the environment's output: its stdout
# and stderr are FIFOs relayed to the virtio-serial ports org.vendetta.stdout
# and org.vendetta.stderr, which libvirt writes to files on the host. A
# workspace command started by the provider writes to the same FIFOs, so
# `echo x > /proc/1/fd/1` reaches the logs, as in a container.
#
# A guest whose workspace publishes ports has one virtio NIC on QEMU's
# restricted user-mode network (providers/qemu/network.py): init gives eth0
# the address QEMU forwards the node's ports to (10.0.2.15/24), with no
# default route: nothing but those forwards reaches the guest or leaves it.
# Services must listen on that address or on all addresses (0.0.0.0), as in
# a container; a listener on 127.0.0.1 alone is not reachable from outside.
set -euo pipefail

IMAGE_DIR=${VENDETTA_IMAGE_DIR:-/var/cache/vendetta/images}
NAME=debian-12
OUT=$IMAGE_DIR/$NAME
STAMP=$OUT/.built
# Bump when what the image holds changes: an older cached build is replaced.
# The stamp also names the root filesystem's cache (scripts/debian-rootfs.sh):
# a new one is a new image too.
IMAGE_VERSION=5
ROOTFS_SIZE=2G   # sparse: the qcow2 holds only what is used (~300 MB: the Debian userland)
BUSYBOX=/bin/busybox
force=0

log() { printf 'build-guest-image: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
# shellcheck source=scripts/debian-rootfs.sh
source "$(dirname "${BASH_SOURCE[0]}")/debian-rootfs.sh"
ROOTFS=${TEST_ROOTFS_CACHE##*/}
ROOTFS=${ROOTFS%.tar.gz}

for arg in "$@"; do
    case $arg in
        --force) force=1 ;;
        -h|--help) sed -n '2,6p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) die "unknown option: $arg (try --help)" ;;
    esac
done

[[ $(id -u) == 0 ]] || die "run as root"
if ((force == 0)) && [[ -f $STAMP ]] && grep -q "^v$IMAGE_VERSION rootfs $ROOTFS " "$STAMP" && [[ -f $OUT/vmlinuz && -f $OUT/initrd.img && -f $OUT/rootfs.qcow2 ]]; then
    log "$OUT present ($(<"$STAMP")); --force rebuilds"
    exit 0
fi
[[ -x $BUSYBOX ]] || BUSYBOX=$(command -v busybox) || die "busybox not found: apt-get install busybox-static"
for applet in switch_root ip; do
    "$BUSYBOX" --list | grep -x "$applet" >/dev/null || die "$BUSYBOX lacks $applet"
done
ldd "$BUSYBOX" >/dev/null 2>&1 && die "$BUSYBOX is dynamically linked: install busybox-static"
for tool in qemu-img mkfs.ext4 dpkg-deb apt-get ldd gzip strings tar; do
    command -v "$tool" >/dev/null || die "$tool not found (bash scripts/engine-qemu.sh installs qemu-utils)"
done

start=$SECONDS
work=$(mktemp -d /tmp/vd-guest-XXXXXX)
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"

# --- the Debian root filesystem (made once, also when the test image is not yet built)
test_rootfs

# --- packages: the cloud kernel (the metapackage names the real one) and the agent
download() {
    apt-get download "$@" >/dev/null 2>&1 \
        || { apt-get update >/dev/null && apt-get download "$@" >/dev/null 2>&1; } \
        || die "apt-get download $* failed"
}
log "downloading linux-image-cloud-amd64, qemu-guest-agent"
cd "$work"
download linux-image-cloud-amd64 qemu-guest-agent
kpkg=$(dpkg-deb -f linux-image-cloud-amd64_*.deb Depends | grep -o 'linux-image-[0-9][^ ,]*-cloud-amd64' | head -n1)
[[ -n $kpkg ]] || die "cannot find the kernel package linux-image-cloud-amd64 depends on"
download "$kpkg"
mkdir -p kernel agent
dpkg-deb -x "$kpkg"_*.deb kernel
dpkg-deb -x qemu-guest-agent_*.deb agent
kver=${kpkg#linux-image-}
moddir=kernel/lib/modules/$kver/kernel
# The modules the guest needs, with their dependencies first (busybox insmod
# resolves nothing): read from each module's .modinfo "depends=" entry.
WANTED_MODULES=(virtio_pci virtio_blk virtio_console virtio_net button)
MODULES=()
add_module() {
    local name=$1 file dep have
    for have in "${MODULES[@]}"; do [[ ${have##*/} == "$name.ko" ]] && return 0; done
    file=$(find "$moddir" -name "$name.ko" -print -quit)
    [[ -n $file ]] || die "$kpkg has no module $name"
    for dep in $(strings "$file" | sed -n 's/^depends=//p' | tr ',' ' '); do
        add_module "$dep"
    done
    MODULES+=("${file#"$moddir"/}")
}
for m in "${WANTED_MODULES[@]}"; do add_module "$m"; done
log "guest modules: ${MODULES[*]##*/}"

# --- a root filesystem: Debian's, qemu-ga + its libraries, our init, busybox for the rest
# Busybox's applets that no bin folder of ROOT has (Debian's commands stay Debian's).
add_busybox() {
    local root=$1 applet dir
    mkdir -p "$root/bin" "$root/sbin" "$root/usr/bin" "$root/usr/sbin"
    cp "$BUSYBOX" "$root/bin/busybox"
    for applet in $("$BUSYBOX" --list); do
        [[ $applet == busybox ]] && continue
        for dir in bin sbin usr/bin usr/sbin; do
            [[ -e $root/$dir/$applet || -L $root/$dir/$applet ]] && continue 2
        done
        ln -s busybox "$root/bin/$applet"
    done
}
copy_with_libs() {  # copy_with_libs ROOT BINARY DEST
    local root=$1 bin=$2 dest=$3 lib
    install -D -m 755 "$bin" "$root$dest"
    while read -r lib; do
        [[ -n $lib ]] || continue
        [[ -e $root$lib ]] || install -D -m 755 "$(readlink -f "$lib")" "$root$lib"
    done < <(ldd "$bin" | grep -o '/[^ ]*' | sort -u)
}

root=$work/root
mkdir -p "$root"
tar -C "$root" --numeric-owner -xzf "$TEST_ROOTFS_CACHE"
mkdir -p "$root"/{proc,sys,dev,run,tmp,root,etc,var/log,mnt}
[[ -e $root/var/run || -L $root/var/run ]] || ln -s ../run "$root/var/run"
chmod 1777 "$root/tmp"
copy_with_libs "$root" agent/usr/sbin/qemu-ga /usr/sbin/qemu-ga
# Minbase has util-linux's setpriv, which runs a workspace `user:` given as
# uid[:gid] (busybox's has no --reuid); resize2fs (init grows / with it) comes
# from its package should a minbase lack it.
if ! [[ -x $root/usr/sbin/resize2fs || -x $root/sbin/resize2fs ]]; then
    download e2fsprogs
    mkdir -p e2fs && dpkg-deb -x e2fsprogs_*.deb e2fs
    copy_with_libs "$root" e2fs/sbin/resize2fs /usr/sbin/resize2fs
fi
# Debian's accounts stay (root, dev with uid 1000, the system users).
printf 'vendetta\n' >"$root/etc/hostname"
# Ours, not Debian's (the LXD one of the test image, or a link to systemd).
rm -f "$root/sbin/init" "$root/sbin/shutdown"
cat >"$root/sbin/init" <<'EOF'
#!/bin/sh
# PID 1 of a vendetta guest (see scripts/build-guest-image.sh).
# Its own commands are busybox's (one static binary, soon in memory): Debian's
# dynamically linked ones, read cold from the disk, made the boot ~0.7 s slower.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
exec </dev/null >/dev/console 2>&1
busybox mount -t proc proc /proc; busybox mount -t sysfs sys /sys
busybox mount -t devtmpfs dev /dev 2>/dev/null
busybox mount -t tmpfs -o mode=755 run /run; busybox mkdir -p /run/vendetta
busybox mount -o remount,rw / 2>/dev/null
busybox hostname -F /etc/hostname
echo "vendetta-guest: growing / to the disk"
resize2fs /dev/vda >/dev/null 2>&1 || true
busybox ip link set lo up  # services listen on loopback, as on any distribution
# Published ports arrive on eth0 (only guests with ports have it): the address
# QEMU's forwards connect to; no route out (see providers/qemu/network.py).
if [ -e /sys/class/net/eth0 ]; then
    busybox ip link set eth0 up && busybox ip addr add 10.0.2.15/24 dev eth0 \
        || echo "vendetta-guest: cannot configure eth0: published ports will not answer"
fi
# Device links /dev/virtio-ports/NAME (udev's job on a full system).
busybox mkdir -p /dev/virtio-ports
for p in /sys/class/virtio-ports/*; do
    [ -e "$p/name" ] && busybox ln -sf "../$(busybox basename "$p")" "/dev/virtio-ports/$(busybox cat "$p/name")"
done
echo "vendetta-guest: starting qemu-ga"
qemu-ga -m virtio-serial -p /dev/virtio-ports/org.qemu.guest_agent.0 -f /run/qemu-ga.pid &
# The environment's stdout/stderr: FIFOs relayed to host-side log files.
for s in stdout stderr; do
    busybox mkfifo "/run/vendetta/$s"
    if [ -e "/dev/virtio-ports/org.vendetta.$s" ]; then
        busybox cat <"/run/vendetta/$s" >"/dev/virtio-ports/org.vendetta.$s" &
    else
        busybox cat <"/run/vendetta/$s" >/dev/console &
    fi
done
echo "vendetta-guest: ready"
exec >/run/vendetta/stdout 2>/run/vendetta/stderr
trap '' HUP
# Reap orphans; wake up now and then.
while :; do wait; busybox sleep 1; done
EOF
# qemu-ga's guest-shutdown runs /sbin/shutdown -P|-r|-H +0 MESSAGE.
cat >"$root/sbin/shutdown" <<'EOF'
#!/bin/sh
echo "vendetta-guest: shutting down" >/dev/console
kill -TERM -1 2>/dev/null; busybox sleep 0.3; busybox sync
busybox mount -o remount,ro / 2>/dev/null; busybox sync
case "$1" in -r) busybox reboot -f ;; *) busybox poweroff -f ;; esac
EOF
chmod 755 "$root/sbin/init" "$root/sbin/shutdown"
# After init and shutdown: busybox's poweroff, reboot, ps, ... where Debian has none.
add_busybox "$root"
# What the provider runs (setpriv: util-linux's, see above), and init's resize2fs.
for cmd in sh resize2fs qemu-ga setpriv su tar setsid stty; do
    chroot "$root" /bin/sh -c "command -v $cmd" >/dev/null || die "the root filesystem has no $cmd"
done
for applet in mount hostname ip mkfifo cat sleep ln mkdir basename sync reboot poweroff; do
    "$BUSYBOX" --list | grep -x "$applet" >/dev/null || die "$BUSYBOX lacks $applet (init and shutdown use it)"
done
chroot "$root" qemu-ga --version >/dev/null || die "qemu-ga does not run in the root filesystem"

# --- initramfs: load the virtio modules, mount /dev/vda, switch_root
initrd=$work/initrd
add_busybox "$initrd"
mkdir -p "$initrd"/{proc,sys,dev,newroot,lib/modules}
for m in "${MODULES[@]}"; do
    [[ -f $moddir/$m ]] || die "$kpkg has no $m"
    cp "$moddir/$m" "$initrd/lib/modules/"
done
{
    echo '#!/bin/sh'
    echo 'mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev'
    for m in "${MODULES[@]}"; do echo "insmod /lib/modules/${m##*/} || echo \"initrd: insmod ${m##*/} failed\""; done
    cat <<'EOF'
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done
mount -t ext4 -o rw /dev/vda /newroot || { echo "initrd: cannot mount /dev/vda"; exec sh; }
umount /proc /sys; mount --move /dev /newroot/dev 2>/dev/null || umount /dev
exec switch_root /newroot /sbin/init
EOF
} >"$initrd/init"
chmod 755 "$initrd/init"

mkdir -p "$OUT"
if [[ -f $OUT/rootfs.qcow2 ]] && command -v virsh >/dev/null; then
    # Workspaces' disks are overlays of rootfs.qcow2: after a rebuild, theirs no longer match.
    users=$(for d in $(timeout 10 virsh -c qemu:///system list --all --name 2>/dev/null); do
        timeout 10 virsh -c qemu:///system dumpxml "$d" 2>/dev/null | grep -q "$OUT/" && printf '%s ' "$d"
    done || true)
    # Their overlays would then read a different disk under them: refuse, unless told.
    if [[ -n $users ]]; then
        ((force == 1)) || die "guests defined on the old image: ${users}- their disks are overlays of it: \
destroy their workspaces first (vendetta workspace destroy NAME), or rebuild anyway with --force"
        log "warning: guests defined on the old image: ${users}- destroy and recreate their workspaces"
    fi
fi
rm -f "$STAMP"
(cd "$initrd" && find . | "$BUSYBOX" cpio -o -H newc 2>/dev/null | gzip -1) >"$work/initrd.img"
mkfs.ext4 -q -F -L vendetta-root -d "$root" "$work/rootfs.ext4" "$ROOTFS_SIZE" >/dev/null
qemu-img convert -O qcow2 "$work/rootfs.ext4" "$work/rootfs.qcow2"
# Renamed into place: a guest running on the old files keeps them until it stops.
for f in vmlinuz initrd.img rootfs.qcow2; do
    if [[ $f == vmlinuz ]]; then src=kernel/boot/vmlinuz-$kver; else src=$work/$f; fi
    install -m 644 "$src" "$OUT/.$f.new"
    mv -f "$OUT/.$f.new" "$OUT/$f"
done
printf 'v%s rootfs %s kernel %s, built %s in %ss\n' "$IMAGE_VERSION" "$ROOTFS" "$kver" "$(date -u +%FT%TZ)" "$((SECONDS - start))" >"$STAMP"
log "built $OUT: $(<"$STAMP")"
