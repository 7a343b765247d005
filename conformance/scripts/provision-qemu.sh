#!/bin/sh
# Provision the two QEMU versions the live conformance tests run against.
#
# * QEMU 7.2: Debian bookworm's qemu-system-x86, installed on the host with apt.
# * QEMU 10.0: Debian trixie's qemu-system-x86 inside a minbase debootstrap
#   chroot under $QMIG_QEMU10_ROOT (default /var/cache/qmig/qemu-10.0-trixie).
#   Nothing of it is installed on the host: debootstrap itself is fetched with
#   `apt-get download` and unpacked into a temporary directory. The chroot is
#   reused when its stamp file (written last) is present.
#
# Idempotent. Prints both versions. Exits non-zero on any failure.
# Run ./qemu-10.0 (next to this script) to start the chrooted QEMU.
set -eu

ROOT="${QMIG_QEMU10_ROOT:-/var/cache/qmig/qemu-10.0-trixie}"
STAMP="$ROOT/.qmig-provisioned"
HERE="$(cd "$(dirname "$0")" && pwd)"

log() { printf 'provision-qemu: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (apt-get, debootstrap, chroot)"

# The Debian mirror the host already uses (deb822 or one-line sources).
mirror() {
    uri=""
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        uri=$(awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i ~ /\/debian\/?$/) { print $i; exit } }' "$f")
        [ -n "$uri" ] && break
    done
    if [ -z "$uri" ] && [ -f /etc/apt/sources.list ]; then
        uri=$(awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^https?:.*\/debian\/?$/) { print $i; exit } }' /etc/apt/sources.list)
    fi
    printf '%s\n' "${uri:-http://deb.debian.org/debian}"
}

mkdir -p "$(dirname "$ROOT")"
# One provisioning at a time on this machine.
exec 9>"$(dirname "$ROOT")/.provision.lock"
flock 9

# ---- QEMU 7.2 on the host ------------------------------------------------
if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
    log "installing qemu-system-x86 (host, Debian bookworm)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >&2 || die "apt-get update failed"
    apt-get install -y -q --no-install-recommends qemu-system-x86 >&2 || die "apt-get install qemu-system-x86 failed"
fi

# ---- QEMU 10.0 in a trixie chroot ----------------------------------------
if [ -f "$STAMP" ] && [ -x "$ROOT/usr/bin/qemu-system-x86_64" ]; then
    log "reusing $ROOT ($(cat "$STAMP"))"
else
    start=$(date +%s)
    MIRROR=$(mirror)
    log "building $ROOT from $MIRROR (trixie, minbase)"
    TMP=$(mktemp -d /tmp/qmig-provision.XXXXXX)
    BUILD="$ROOT.build"
    cleanup() { rm -rf "$TMP"; }
    trap cleanup EXIT
    rm -rf "$BUILD" "$ROOT"
    (cd "$TMP" && apt-get download -q debootstrap >&2) || die "apt-get download debootstrap failed"
    dpkg-deb -x "$TMP"/debootstrap_*.deb "$TMP/dbs" || die "unpacking debootstrap failed"
    DEBOOTSTRAP_DIR="$TMP/dbs/usr/share/debootstrap" \
        "$TMP/dbs/usr/sbin/debootstrap" --variant=minbase --include=ca-certificates \
        trixie "$BUILD" "$MIRROR" >&2 || die "debootstrap trixie failed"
    # Install QEMU with the chroot's own apt (full dependency resolution),
    # in a private mount namespace so nothing stays mounted on the host.
    unshare -m --propagation private sh -ec '
        B="$1"
        mount --rbind /proc "$B/proc"; mount --rbind /sys "$B/sys"; mount --rbind /dev "$B/dev"
        cp /etc/resolv.conf "$B/etc/resolv.conf" 2>/dev/null || true
        chroot "$B" env DEBIAN_FRONTEND=noninteractive apt-get update -q
        chroot "$B" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends qemu-system-x86
        chroot "$B" apt-get clean
    ' sh "$BUILD" >&2 || die "installing qemu-system-x86 in the chroot failed"
    # Trim what a headless QEMU never reads.
    rm -rf "$BUILD/usr/share/doc" "$BUILD/usr/share/man" "$BUILD/usr/share/info" \
        "$BUILD/usr/share/locale" "$BUILD/usr/share/i18n" \
        "$BUILD/var/cache/apt" "$BUILD/var/lib/apt/lists" "$BUILD/var/cache/debconf"/*-old \
        "$BUILD/var/log"/*.log
    mkdir -p "$BUILD/var/cache/apt" "$BUILD/var/lib/apt/lists/partial"
    "$BUILD/usr/bin/qemu-system-x86_64" --version >/dev/null 2>&1 || \
        chroot "$BUILD" /usr/bin/qemu-system-x86_64 --version >/dev/null || die "chrooted QEMU does not run"
    mv "$BUILD" "$ROOT"
    end=$(date +%s)
    size=$(du -sm "$ROOT" | cut -f1)
    printf 'built %s from %s in %ss, %s MB\n' "$(date -u +%FT%TZ)" "$MIRROR" "$((end - start))" "$size" > "$STAMP"
    log "$(cat "$STAMP")"
fi

v72=$(qemu-system-x86_64 --version | head -n1) || die "QEMU 7.2 does not run"
v10=$("$HERE/qemu-10.0" --version | head -n1) || die "QEMU 10.0 does not run"
printf 'qemu-7.2: %s (%s)\n' "$v72" "$(command -v qemu-system-x86_64)"
printf 'qemu-10.0: %s (%s)\n' "$v10" "$ROOT"
case "$v72" in *"version 7.2"*) ;; *) die "host QEMU is not 7.2: $v72" ;; esac
case "$v10" in *"version 10.0"*) ;; *) die "chroot QEMU is not 10.0: $v10" ;; esac
