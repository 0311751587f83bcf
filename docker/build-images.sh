#!/usr/bin/env bash
# Build the worker, serve and train images with podman (or buildah) on a
# machine without registry access. Usage (from anywhere; run as root):
#
#   docker/build-images.sh [worker] [serve] [train]     # default: all three
#
# Environment:
#   TAG          image tag (default: dev) -> localhost/openimages-od-NAME:TAG
#   BASE_IMAGE   base image for every Dockerfile (default: the Dockerfiles'
#                python:3.11.14-slim-bookworm). If it is neither present
#                locally nor pullable, a Debian bookworm + python3 base is made
#                with debootstrap and tagged localhost/debian-bookworm-python:3.11.
#   DEBIAN_MIRROR mirror for debootstrap (default: the first one apt uses here)
#   BUILDER      podman (default) or buildah
#   RESULTS      JSON lines of build seconds and image bytes (default: build/images.jsonl)
#
# Why the flags: crun fails on hybrid cgroup hosts, so podman builds with
# runc and explicit ulimits; pip inside the build needs the host CA bundle;
# podman 4.3 does not pick up Dockerfile.X.dockerignore by itself.
set -euo pipefail
cd "$(dirname "$0")/.."

TAG=${TAG:-dev}
BUILDER=${BUILDER:-podman}
DEFAULT_BASE=$(sed -n 's/^ARG BASE_IMAGE=//p' docker/Dockerfile.worker | head -n1)
BASE_IMAGE=${BASE_IMAGE:-$DEFAULT_BASE}
LOCAL_BASE=localhost/debian-bookworm-python:3.11
RESULTS=${RESULTS:-build/images.jsonl}
IMAGES=("$@")
[ ${#IMAGES[@]} -gt 0 ] || IMAGES=(worker serve train)

log() { printf '[build-images] %s\n' "$*" >&2; }

image_exists() {
  if [ "$BUILDER" = buildah ]; then buildah --storage-driver vfs inspect --type image "$1" >/dev/null 2>&1
  else podman image exists "$1"; fi
}

debian_mirror() {
  if [ -n "${DEBIAN_MIRROR:-}" ]; then echo "$DEBIAN_MIRROR"; return; fi
  local m
  m=$(grep -hs -E '^URIs: .*debian/?$' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | head -n1)
  [ -n "$m" ] || m=$(grep -hs -E '^deb .*debian/? ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list | awk '{print $2}' | head -n1)
  echo "${m:-http://deb.debian.org/debian}"
}

make_local_base() {
  if image_exists "$LOCAL_BASE"; then log "using existing $LOCAL_BASE"; return; fi
  local rootfs; rootfs=$(mktemp -d /var/tmp/oiod-rootfs.XXXXXX)
  log "debootstrap bookworm from $(debian_mirror) (a few minutes)"
  # passwd: the Dockerfiles create the non-root user with groupadd/useradd.
  debootstrap --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates,passwd \
    bookworm "$rootfs" "$(debian_mirror)" >/dev/null
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  local changes=(--change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
                 --change 'ENV LANG=C.UTF-8')
  if [ "$BUILDER" = buildah ]; then
    local ctr; ctr=$(buildah --storage-driver vfs from scratch)
    buildah --storage-driver vfs copy "$ctr" "$rootfs" / >/dev/null
    buildah --storage-driver vfs config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 "$ctr"
    buildah --storage-driver vfs commit "$ctr" "$LOCAL_BASE" >/dev/null
    buildah --storage-driver vfs rm "$ctr" >/dev/null
  else
    tar -C "$rootfs" -c . | podman import "${changes[@]}" - "$LOCAL_BASE" >/dev/null
  fi
  rm -rf "$rootfs"
  log "made $LOCAL_BASE"
}

resolve_base() {
  if image_exists "$BASE_IMAGE"; then echo "$BASE_IMAGE"; return; fi
  if [ "$BUILDER" = podman ] && timeout 60 podman pull -q "$BASE_IMAGE" >/dev/null 2>&1; then
    echo "$BASE_IMAGE"; return
  fi
  log "$BASE_IMAGE cannot be pulled: building a local Debian base instead"
  make_local_base
  echo "$LOCAL_BASE"
}

image_bytes() {
  if [ "$BUILDER" = buildah ]; then buildah --storage-driver vfs inspect --type image --format '{{.Size}}' "$1" 2>/dev/null || echo 0
  else podman image inspect --format '{{.Size}}' "$1"; fi
}

build_one() {
  local name=$1 base=$2 ref="localhost/openimages-od-$1:$TAG" start end
  local common=(--build-arg "BASE_IMAGE=$base" --network host -v /etc/ssl/certs:/etc/ssl/certs:ro
                --ignorefile "docker/Dockerfile.$name.dockerignore" -f "docker/Dockerfile.$name" -t "$ref")
  log "building $ref on $base"
  start=$(date +%s)
  if [ "$BUILDER" = buildah ]; then
    buildah --storage-driver vfs bud --isolation chroot --pull-never --format docker "${common[@]}" .
  else
    podman build --pull=never --runtime runc --format docker --ulimit nofile=1024:20000 \
      --ulimit nproc=4096:4096 "${common[@]}" .
  fi
  end=$(date +%s)
  local bytes; bytes=$(image_bytes "$ref")
  mkdir -p "$(dirname "$RESULTS")"
  printf '{"image": "%s", "base": "%s", "seconds": %d, "bytes": %s}\n' "$ref" "$base" $((end - start)) "$bytes" >> "$RESULTS"
  log "$ref: $((end - start)) s, $((bytes / 1000000)) MB"
}

base=$(resolve_base)
for name in "${IMAGES[@]}"; do
  case "$name" in worker|serve|train) build_one "$name" "$base" ;; *) log "unknown image $name"; exit 2 ;; esac
done
