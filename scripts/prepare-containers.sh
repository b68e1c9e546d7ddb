#!/usr/bin/env bash
# Prepare a machine without container-registry access to run docker-compose.yml with podman.
#
#   scripts/prepare-containers.sh            (as root; idempotent: skips what is already done)
#   podman-compose -f docker-compose.yml -f deploy/podman/compose.override.yaml \
#       up -d --no-build peer0 peer1 peer2 peer3 prometheus
#
# Steps, each skipped when already done:
#   1. apt-get install podman podman-compose debootstrap;
#   2. /etc/containers/containers.conf.d/50-decentlam-ulimits.conf: `default_ulimits = []`
#      (podman otherwise raises the open-files limit of every container, which machines that
#      forbid it answer with "error setting rlimits ... operation not permitted");
#   3. a local Debian base image with python3 and its venv module (debootstrap from the Debian
#      mirror apt already uses, then `podman import`), instead of pulling python:3.11-slim;
#   4. the project image decentlam:latest from the Dockerfile on that base, torch from pip's
#      local find-links directory (the CPU wheel) and the rest from the package index through
#      the host's CA bundle; podman's layer cache makes an unchanged tree a no-op rebuild;
#   5. localhost/decentlam-prometheus:latest: Debian's prometheus package on the same base
#      (deploy/podman/prometheus.Containerfile), instead of pulling prom/prometheus.
#
# Environment overrides: DECENTLAM_BASE_IMAGE (localhost/debian-py:bookworm),
# DECENTLAM_IMAGE (decentlam:latest), DECENTLAM_PROMETHEUS_IMAGE
# (localhost/decentlam-prometheus:latest), DEBIAN_MIRROR (from apt's sources), DECENTLAM_WHEELS_DIR
# (pip's find-links), DECENTLAM_CA_BUNDLE (pip's cert, else /etc/ssl/certs/ca-certificates.crt),
# TORCH_VERSION (2.13.0). Flags: --rebuild-base makes the base image again; --no-images stops
# after step 2.
set -euo pipefail

BASE_IMAGE=${DECENTLAM_BASE_IMAGE:-localhost/debian-py:bookworm}
IMAGE=${DECENTLAM_IMAGE:-decentlam:latest}
PROMETHEUS_IMAGE=${DECENTLAM_PROMETHEUS_IMAGE:-localhost/decentlam-prometheus:latest}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
SUITE=bookworm  # python3.11: the interpreter of the cp311 torch wheel
ULIMITS_CONF=/etc/containers/containers.conf.d/50-decentlam-ulimits.conf
ROOT=$(cd "$(dirname "$0")/.." && pwd)

rebuild_base=0
build_images=1
for arg in "$@"; do
    case "$arg" in
        --rebuild-base) rebuild_base=1 ;;
        --no-images) build_images=0 ;;
        -h | --help)
            sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "prepare-containers: unknown argument $arg (try --help)" >&2
            exit 2
            ;;
    esac
done

log() { echo "prepare-containers: $*" >&2; }
die() {
    echo "prepare-containers: error: $*" >&2
    exit 1
}

[ "$(id -u)" -eq 0 ] || die "must run as root (apt-get, debootstrap and rootful podman)"

# --- 1. packages ---------------------------------------------------------------------------
missing=()
for tool in podman podman-compose debootstrap; do
    command -v "$tool" > /dev/null || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" > /dev/null
else
    log "podman, podman-compose and debootstrap are installed"
fi

# --- 2. ulimits ----------------------------------------------------------------------------
if grep -qs '^default_ulimits = \[\]' "$ULIMITS_CONF"; then
    log "$ULIMITS_CONF is in place"
else
    log "writing $ULIMITS_CONF (containers keep the host's open-files limit)"
    mkdir -p "$(dirname "$ULIMITS_CONF")"
    printf '# Written by decentlam scripts/prepare-containers.sh: do not raise rlimits in containers\n[containers]\ndefault_ulimits = []\n' \
        > "$ULIMITS_CONF.tmp"
    mv "$ULIMITS_CONF.tmp" "$ULIMITS_CONF"
fi

[ "$build_images" -eq 1 ] || exit 0

# --- 3. base image -------------------------------------------------------------------------
debian_mirror() {
    # The first non-security Debian URI of apt's sources (deb822 files, then one-line lists).
    local found=""
    if compgen -G '/etc/apt/sources.list.d/*.sources' > /dev/null; then
        found=$(awk '/^URIs:/ { for (i = 2; i <= NF; i++) if ($i !~ /security/) { print $i; exit } }' \
            /etc/apt/sources.list.d/*.sources)
    fi
    if [ -z "$found" ]; then
        found=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2> /dev/null \
            | awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) {
                  if ($i !~ /security/) { print $i; exit } else break } }')
    fi
    echo "${found:-http://deb.debian.org/debian}"
}

if [ "$rebuild_base" -eq 0 ] && podman image exists "$BASE_IMAGE"; then
    log "base image $BASE_IMAGE exists"
else
    mirror=${DEBIAN_MIRROR:-$(debian_mirror)}
    rootfs=$(mktemp -d /var/tmp/decentlam-rootfs.XXXXXX)
    trap 'rm -rf "$rootfs"' EXIT
    log "debootstrap $SUITE from $mirror (about a minute)"
    started=$SECONDS
    debootstrap --variant=minbase --include=python3,python3-venv "$SUITE" "$rootfs" "$mirror" \
        > "$rootfs.log" 2>&1 || {
        tail -20 "$rootfs.log" >&2
        rm -f "$rootfs.log"
        die "debootstrap $SUITE from $mirror failed (log above)"
    }
    rm -f "$rootfs.log"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    log "importing $BASE_IMAGE"
    tar -C "$rootfs" -c . | podman import \
        --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' - "$BASE_IMAGE" > /dev/null
    rm -rf "$rootfs"
    trap - EXIT
    log "base image $BASE_IMAGE made in $((SECONDS - started)) s"
fi

# --- 4. project image ----------------------------------------------------------------------
wheels_dir() {
    # The first find-links directory holding the CPU torch wheel (DECENTLAM_WHEELS_DIR, pip's
    # PIP_FIND_LINKS, then pip's configuration).
    local candidates="${DECENTLAM_WHEELS_DIR:-} ${PIP_FIND_LINKS:-}"
    candidates+=" $(python3 -m pip config get global.find-links 2> /dev/null || true)"
    candidates+=" $(python3 -m pip config get install.find-links 2> /dev/null || true)"
    local dir
    for dir in $candidates; do
        dir=${dir#file://}
        if compgen -G "$dir/torch-${TORCH_VERSION}+cpu-*.whl" > /dev/null; then
            echo "$dir"
            return
        fi
    done
}

ca_bundle() {
    local cert=${DECENTLAM_CA_BUNDLE:-${PIP_CERT:-$(python3 -m pip config get global.cert 2> /dev/null || true)}}
    [ -n "$cert" ] || cert=/etc/ssl/certs/ca-certificates.crt
    [ -f "$cert" ] && echo "$cert"
}

build_args=(--format docker --network host --label io.decentlam.prepared=1
    --build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "TORCH_VERSION=$TORCH_VERSION")
cert=$(ca_bundle || true)
if [ -n "$cert" ]; then
    # Mounted where the image expects the bundle; pip inside the build verifies with it.
    build_args+=(-v "$cert:/etc/ssl/certs/ca-certificates.crt:ro"
        --build-arg "PIP_CERT=/etc/ssl/certs/ca-certificates.crt")
fi
wheels=$(wheels_dir || true)
peer_args=("${build_args[@]}")
if [ -n "$wheels" ]; then
    log "torch $TORCH_VERSION+cpu from $wheels"
    peer_args+=(-v "$wheels:/wheels:ro" --build-arg WHEELS_DIR=/wheels)
else
    log "no local torch $TORCH_VERSION+cpu wheel: the build pulls it from download.pytorch.org"
fi

started=$SECONDS
log "building $IMAGE (unchanged layers come from podman's cache)"
podman build -q "${peer_args[@]}" -t "$IMAGE" -f "$ROOT/Dockerfile" "$ROOT" > /dev/null \
    || die "building $IMAGE failed (run: podman build ${peer_args[*]} -t $IMAGE $ROOT)"
log "$IMAGE is up to date ($((SECONDS - started)) s)"

# --- 5. Prometheus image -------------------------------------------------------------------
started=$SECONDS
log "building $PROMETHEUS_IMAGE (Debian's prometheus package on $BASE_IMAGE)"
podman build -q "${build_args[@]}" -t "$PROMETHEUS_IMAGE" \
    -f "$ROOT/deploy/podman/prometheus.Containerfile" "$ROOT/deploy/podman" > /dev/null \
    || die "building $PROMETHEUS_IMAGE failed"
log "$PROMETHEUS_IMAGE is up to date ($((SECONDS - started)) s)"

# Images these builds replaced (untagged now): free their space, keep podman's layer cache.
podman image prune -f --filter label=io.decentlam.prepared=1 > /dev/null || true
