#!/usr/bin/env bash
# The node users the tests log in as (run as root; idempotent, fast when done):
#
#   bash scripts/test-users.sh
#
#   vdnode      a developer's own account: in the docker, lxd, libvirt and kvm
#               groups, so it reaches all three engines without being root
#   vdoutsider  an account in none of them: every engine must tell it what is
#               missing and how to fix it
#
# Both get a home of their own (mode 0755, the Debian default) and a login
# shell; neither gets a password (tests log in with keys). Run after the
# engines are installed (their packages make the groups; made here if not).
set -euo pipefail

MEMBER=vdnode
OUTSIDER=vdoutsider
GROUPS_=(docker lxd libvirt kvm)

log() { printf 'test-users: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ $(id -u) == 0 ]] || die "run as root (creates users)"

ensure_user() {
    local user=$1
    if id "$user" >/dev/null 2>&1; then
        return 0
    fi
    useradd --create-home --home-dir "/home/$user" --shell /bin/bash --user-group "$user"
    log "user $user created"
}

for group in "${GROUPS_[@]}"; do
    getent group "$group" >/dev/null || groupadd --system "$group"
done
ensure_user "$MEMBER"
ensure_user "$OUTSIDER"
chmod 0755 "/home/$MEMBER" "/home/$OUTSIDER"
# No password, but not locked: sshd without PAM refuses locked accounts even to keys.
usermod --password '*' "$MEMBER"
usermod --password '*' "$OUTSIDER"
# Exactly these groups (an earlier run may have added others by hand).
usermod --groups "$(IFS=,; echo "${GROUPS_[*]}")" "$MEMBER"
usermod --groups "" "$OUTSIDER"
log "$MEMBER in ${GROUPS_[*]}; $OUTSIDER in none"
