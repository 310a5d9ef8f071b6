#!/usr/bin/env bash
# Build the kproxyd:latest image without a container registry:
#   1. debootstrap a minimal Debian bookworm root filesystem with the tools kproxyd drives
#      (cached in build/image/base; deleted and rebuilt only when the package list changes),
#   2. build wheels of kproxyd and its dependencies on this host (same Python 3.11 as bookworm's),
#   3. copy the base into build/image/rootfs and install the wheels into /opt/kproxyd/venv via chroot
#      (offline: --no-index), with /usr/local/bin/kproxyd on PATH,
#   4. tar the rootfs into `podman import` as kproxyd:latest.
# Needs root and: apt-get install -y debootstrap podman runc
# Environment: IMAGE (kproxyd:latest), BUILD_DIR (build/image), MIRROR (http://deb.debian.org/debian),
#              PYTHON (the python whose pip builds the wheels; .venv/bin/python, else python3).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
IMAGE=${IMAGE:-kproxyd:latest}
BUILD_DIR=${BUILD_DIR:-$repo/build/image}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
PACKAGES=python3,python3-venv,iptables,nftables,iproute2,conntrack,procps,ca-certificates
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x $repo/.venv/bin/python ]]; then PYTHON=$repo/.venv/bin/python; else PYTHON=python3; fi
fi
export CONTAINERS_CONF=${CONTAINERS_CONF:-$repo/image/containers.conf}

log() { printf '%s build.sh: %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ $(id -u) -eq 0 ]] || die "needs root (debootstrap, chroot)"
for tool in debootstrap podman runc chroot tar; do
  command -v "$tool" >/dev/null || die "$tool not found; apt-get install -y debootstrap podman runc"
done

base=$BUILD_DIR/base
rootfs=$BUILD_DIR/rootfs
wheels=$BUILD_DIR/wheels
mkdir -p "$BUILD_DIR"

# 1. The cached base root filesystem.
stamp="$SUITE $PACKAGES"
if [[ ! -f $base/.kproxyd-base || $(cat "$base/.kproxyd-base") != "$stamp" ]]; then
  log "debootstrap $SUITE into $base (1-2 minutes; cached afterwards)"
  rm -rf "$base" "$base.tmp"
  debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$base.tmp" "$MIRROR" >"$BUILD_DIR/debootstrap.log" 2>&1 \
    || die "debootstrap failed; see $BUILD_DIR/debootstrap.log"
  # Slim it: no apt lists, docs or man pages in the image.
  rm -rf "$base.tmp"/var/lib/apt/lists/* "$base.tmp"/var/cache/apt/*.bin "$base.tmp"/var/cache/apt/archives/*.deb \
    "$base.tmp"/usr/share/doc/* "$base.tmp"/usr/share/man/* "$base.tmp"/usr/share/locale/*
  echo "$stamp" >"$base.tmp/.kproxyd-base"
  mv "$base.tmp" "$base"
else
  log "reusing the cached base root filesystem in $base"
fi

# 2. Wheels of kproxyd and its dependencies (pip's cache makes rebuilds quick).
log "building wheels with $PYTHON"
rm -rf "$wheels"
"$PYTHON" -m pip wheel -q --wheel-dir "$wheels" "$repo" >"$BUILD_DIR/wheels.log" 2>&1 \
  || die "pip wheel failed; see $BUILD_DIR/wheels.log"

# 3. The image's root filesystem: the base plus a venv with kproxyd.
log "installing kproxyd into $rootfs"
rm -rf "$rootfs"
cp -a "$base" "$rootfs"
rm -f "$rootfs/.kproxyd-base"
mkdir -p "$rootfs/tmp/wheels"
cp "$wheels"/*.whl "$rootfs/tmp/wheels/"
chroot "$rootfs" /usr/bin/env -i PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root /bin/sh -euc '
  python3 -m venv /opt/kproxyd/venv
  /opt/kproxyd/venv/bin/pip install -q --no-cache-dir --no-index --find-links=/tmp/wheels kproxyd
  ln -sf /opt/kproxyd/venv/bin/kproxyd /usr/local/bin/kproxyd
  # Compiled now: the DaemonSet runs with a read-only root, where Python could not cache its bytecode.
  /opt/kproxyd/venv/bin/python -m compileall -q /opt/kproxyd/venv >/dev/null
  kproxyd --help >/dev/null
' >"$BUILD_DIR/install.log" 2>&1 || die "installing into the rootfs failed; see $BUILD_DIR/install.log"
rm -rf "$rootfs/tmp/wheels" "$rootfs/root/.cache"
# The image carries no host identity: an empty resolv.conf and hostname are bind-mounted by the runtime.
: >"$rootfs/etc/resolv.conf"
: >"$rootfs/etc/hostname"

# 4. Import.
revision=$(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)
log "podman import $IMAGE (revision $revision)"
tar --numeric-owner -C "$rootfs" -c . | podman import --quiet \
  --change 'CMD ["kproxyd"]' \
  --change 'ENV PATH=/opt/kproxyd/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change "LABEL org.opencontainers.image.title=kproxyd org.opencontainers.image.revision=$revision" \
  --message "kproxyd $revision from image/build.sh" \
  - "$IMAGE" >/dev/null
log "built $IMAGE ($(podman image inspect --format '{{.Size}}' "$IMAGE" | numfmt --to=iec) )"
