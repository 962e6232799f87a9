#!/usr/bin/env bash
# Make the base image `trmrl/debian-python:bookworm` without an image registry: debootstrap a minimal
# Debian bookworm (python3.11 + venv) from the apt mirror this machine uses, then `docker import` it.
# Cached: does nothing when the image exists (FORCE=1 rebuilds it).
#
#   docker/make-base-image.sh [IMAGE_TAG]
set -euo pipefail

TAG="${1:-${BASE_TAG:-trmrl/debian-python:bookworm}}"
SUITE="${SUITE:-bookworm}"
MIRROR="${MIRROR:-}"
if [[ -z "$MIRROR" ]]; then
    # The mirror apt already uses (deb822 or one-line sources), else Debian's CDN.
    MIRROR="$(grep -rhoE '(URIs:|deb) +https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
        | grep -oE 'https?://[^ ]+' | head -1 || true)"
    MIRROR="${MIRROR:-http://deb.debian.org/debian}"
fi

if [[ "${FORCE:-0}" != 1 ]] && docker image inspect "$TAG" >/dev/null 2>&1; then
    echo "base image $TAG exists (FORCE=1 to rebuild)"
    exit 0
fi
command -v debootstrap >/dev/null || { apt-get update -qq && apt-get install -y -qq debootstrap; }

ROOT="$(mktemp -d /tmp/trmrl-rootfs.XXXXXX)"
trap 'rm -rf "$ROOT"' EXIT
echo "debootstrap $SUITE from $MIRROR into $ROOT"
debootstrap --variant=minbase \
    --include=python3,python3-venv,ca-certificates,tini \
    "$SUITE" "$ROOT" "$MIRROR" >"$ROOT.log" 2>&1 || { tail -30 "$ROOT.log"; exit 1; }
rm -f "$ROOT.log"
# Slim it: no apt lists, caches, docs or man pages in the image.
chroot "$ROOT" apt-get clean
rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/*.bin "$ROOT"/usr/share/doc/* \
    "$ROOT"/usr/share/man/* "$ROOT"/usr/share/info/* "$ROOT"/tmp/* "$ROOT"/var/log/*.log
echo "deb $MIRROR $SUITE main" >"$ROOT/etc/apt/sources.list"
tar -C "$ROOT" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    - "$TAG"
docker image ls "$TAG"
