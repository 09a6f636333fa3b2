#!/usr/bin/env bash
# A Debian base image made here, for builds with no registry to pull from (air-gapped build hosts, and the
# development machines): debootstrap a minimal bookworm with Python 3.11, venv, bash, CA certificates and wget (KubeRay's probes), and
# commit it with buildah as $BASE_IMAGE (default localhost/herd-base:bookworm). Needs root, debootstrap, buildah and
# a Debian mirror (the one apt uses, or $DEBIAN_MIRROR). Skips the work when the image is already there.
set -euo pipefail
image="${BASE_IMAGE:-localhost/herd-base:bookworm}"
if buildah inspect --type image "$image" >/dev/null 2>&1; then
    echo "base image $image is present"
    exit 0
fi
mirror="${DEBIAN_MIRROR:-}"
if [[ -z "$mirror" ]]; then
    # The mirror apt already uses (deb822 sources or a sources.list line), else Debian's own.
    mirror="$(grep -h -m1 -oE '^URIs: *\S+' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1 | awk '{print $2}')"
    mirror="${mirror:-$(grep -h -m1 -oE '^deb +\S+' /etc/apt/sources.list 2>/dev/null | awk '{print $2}')}"
    mirror="${mirror:-http://deb.debian.org/debian}"
fi
rootfs="$(mktemp -d)"
trap 'rm -rf "$rootfs"' EXIT
echo "debootstrap bookworm from $mirror"
debootstrap --variant=minbase --include=python3,python3-venv,bash,ca-certificates,wget bookworm "$rootfs" "$mirror" \
    >"$rootfs.log" 2>&1 || { tail -20 "$rootfs.log"; exit 1; }
rm -f "$rootfs.log"
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
container="$(buildah from scratch)"
mountpoint="$(buildah mount "$container")"
cp -a "$rootfs"/. "$mountpoint"/
buildah umount "$container" >/dev/null
buildah config --cmd /bin/bash --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$container"
buildah commit --quiet --rm "$container" "$image" >/dev/null
echo "base image $image committed"
