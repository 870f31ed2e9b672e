#!/usr/bin/env bash
# Set up a development/CI machine (Debian 12, root, no systemd): system
# packages, the project venv (.venv) and the real engines the tests use.
# Idempotent and fast when everything is already in place.
#
#   bash scripts/setup.sh               # everything
#   bash scripts/setup.sh --no-engines  # skip scripts/engines.sh start
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=$ROOT/.venv
PYTHON=${PYTHON:-python3}
start_engines=1

log() { printf 'setup: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

for arg in "$@"; do
    case $arg in
        --no-engines) start_engines=0 ;;
        -h|--help) sed -n '2,6p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) die "unknown option: $arg (try --help)" ;;
    esac
done

[[ $(id -u) == 0 ]] || die "run as root (installs packages, starts dockerd)"

command -v "$PYTHON" >/dev/null || die "$PYTHON not found"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "Python >= 3.11 required, $PYTHON is $("$PYTHON" -V 2>&1)"

# --- system packages -------------------------------------------------------
packages=(docker.io openssh-server busybox-static iproute2 make git ca-certificates tmux
          # libvirt-python (a project dependency) builds against these at pip install time
          gcc pkg-config libvirt-dev python3-dev)
# `python3 -m venv --help` works on Debian even without python3-venv; what the
# package adds is ensurepip, without which `python3 -m venv` fails.
if ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    packages+=(python3-venv)
fi
missing=()
for pkg in "${packages[@]}"; do
    if [[ $(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null) != "install ok installed" ]]; then
        missing+=("$pkg")
    fi
done
if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# --- project venv ------------------------------------------------------------
if [[ -d $VENV ]] && ! "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        >/dev/null 2>&1; then
    log "$VENV is broken or too old; recreating it"
    rm -rf "$VENV"
fi
if [[ ! -d $VENV ]]; then
    log "creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi

stamp=$VENV/.installed-$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)
if [[ -f $stamp ]]; then
    log "venv up to date with pyproject.toml"
else
    log "installing the project into $VENV (pip install -e '.[dev]')"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$ROOT[dev]"
    rm -f "$VENV"/.installed-*
    touch "$stamp"
fi

# --- engines -----------------------------------------------------------------
if ((start_engines)); then
    bash "$ROOT/scripts/engines.sh" start
    # The Debian image of the editor tests (ssh -L/-R/-A, sftp, rsync, git), once.
    bash "$ROOT/scripts/build-test-image.sh"
fi
log "done"
