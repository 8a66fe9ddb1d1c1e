#!/bin/sh
# A plain Debian base image built from Debian packages, for machines that reach a Debian mirror
# but no image registry (our CI and dev machines): debootstrap's minimal variant, imported into
# podman's store. Cached: does nothing when the image exists. Needs root, podman and debootstrap.
# Usage: docker/base-image.sh [IMAGE] (default localhost/debian-bookworm:local); SUITE and
# MIRROR pick the release and the mirror (default bookworm from debootstrap's default mirror).
set -eu

image=${1:-localhost/debian-bookworm:local}
suite=${SUITE:-bookworm}

if podman image exists "$image"; then
    echo "base-image: $image already in podman's store" >&2
    exit 0
fi
rootfs=$(mktemp -d "${TMPDIR:-/tmp}/codetr-rootfs.XXXXXX")
trap 'rm -rf "$rootfs" "$rootfs.log"' EXIT
echo "base-image: debootstrap $suite into $rootfs (about 2 minutes)" >&2
# shellcheck disable=SC2086  # MIRROR is optional: absent, debootstrap uses its default
debootstrap --variant=minbase "$suite" "$rootfs" ${MIRROR:-} >"$rootfs.log" 2>&1 || {
    tail -n 20 "$rootfs.log" >&2
    exit 1
}
# The downloaded .debs and package lists are 80 MB a child image never needs (it runs apt-get
# update itself).
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" -c . | podman import --message "debootstrap --variant=minbase $suite" - "$image"
echo "base-image: $image" >&2
