#!/usr/bin/env bash
# Build the local Docker image the integration tests use to run small test engines
# (e.g. tests/fake_engine.py) in real containers.
#
# No registry is reachable from CI/dev machines, so nothing is pulled: a minimal Debian
# bookworm rootfs with python3 + python3-aiohttp is made with debootstrap from the package
# mirror this machine's apt already uses, trimmed, and turned into an image with `docker import`.
# The mirror is the first `deb` source serving the suite in /etc/apt/sources.list,
# /etc/apt/sources.list.d/*.list or the deb822 `URIs:` of /etc/apt/sources.list.d/*.sources;
# SPARKGATE_TEST_MIRROR overrides it (this repository names no mirror host of its own).
#
#   tests/docker/build_image.sh            # builds sparkgate-test-engine:1 unless it exists
#   SPARKGATE_TEST_IMAGE=foo:2 tests/docker/build_image.sh
#   SPARKGATE_TEST_MIRROR=http://mirror.example/debian tests/docker/build_image.sh
#
# Sourced (`. tests/docker/build_image.sh`), it only defines its functions (apt_mirror).
#
# Then, every time (seconds: Docker's build cache), the derived image sparkgate-test-multinode:1
# (SPARKGATE_TEST_MULTINODE_IMAGE) FROM it, with the fake multi-node engines of tests/docker/multinode/.
#
# The image has no entrypoint; tests mount their scripts and run e.g.
#   docker run --rm -v "$PWD/tests:/opt/tests:ro" -p 127.0.0.1:18777:8000 sparkgate-test-engine:1 \
#       python3 /opt/tests/fake_engine.py --host 0.0.0.0 --port 8000 --model m
# python3 is PID 1 there. aiohttp's web.run_app installs a SIGTERM handler, so `docker stop`
# is prompt; a script that installs no handler ignores SIGTERM as PID 1 (docker stop then
# waits its timeout and SIGKILLs) -- use `docker run --init` for such scripts.
#
# Needs root (debootstrap, apt-get) and a working `docker` CLI. Re-running is cheap: an
# existing image is the cache.

log() { printf '[build_image] %s\n' "$*" >&2; }

APT_SOURCES=(/etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources)

# apt_mirror SUITE FILE...: prints the URI of the first `deb` source in FILEs that serves SUITE (one-line
# *.list entries, deb822 *.sources stanzas; commented, deb-src and `Enabled: no` sources skipped); prints
# nothing and fails when none does.
apt_mirror() {
    local suite=$1 file uri
    shift
    for file in "$@"; do
        [[ -f "$file" && -r "$file" ]] || continue
        case "$file" in
            *.sources)
                uri=$(awk -v suite="$suite" '
                    function flush() {
                        if (!found && (" " types " ") ~ / deb / && enabled !~ /^(no|false)$/ \
                            && (" " suites " ") ~ (" " suite " ") && split(uris, u, " ") > 0) {
                            print u[1]; found = 1
                        }
                        types = uris = suites = enabled = ""
                    }
                    /^[[:space:]]*#/ { next }
                    /^[[:space:]]*$/ { flush(); next }
                    /^[[:space:]]/ { next }  # a continuation line: not used here
                    {
                        key = tolower($1); sub(/:.*/, "", key)
                        value = $0; sub(/^[^:]*:[[:space:]]*/, "", value)
                        if (key == "types") types = value
                        else if (key == "uris") uris = value
                        else if (key == "suites") suites = value
                        else if (key == "enabled") enabled = tolower(value)
                    }
                    END { flush() }' "$file") ;;
            *)
                uri=$(sed -e 's/#.*//' -e 's/\[[^]]*\]//' "$file" |
                      awk -v suite="$suite" '$1 == "deb" && $3 == suite && !found { print $2; found = 1 }') ;;
        esac
        if [[ -n "$uri" ]]; then
            printf '%s\n' "$uri"
            return 0
        fi
    done
    return 1
}

if [[ "${BASH_SOURCE[0]}" != "$0" ]]; then
    return 0  # sourced: the functions only
fi

set -euo pipefail

TAG="${SPARKGATE_TEST_IMAGE:-sparkgate-test-engine:1}"
MULTINODE_TAG="${SPARKGATE_TEST_MULTINODE_IMAGE:-sparkgate-test-multinode:1}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
SUITE="${SPARKGATE_TEST_SUITE:-bookworm}"
PACKAGES="python3,python3-aiohttp"

build_multinode() {
    # A local FROM needs no registry; the legacy builder needs no buildx plugin.
    local out
    if ! out=$(DOCKER_BUILDKIT=0 docker build -q --build-arg BASE="$TAG" -t "$MULTINODE_TAG" "$HERE/multinode" 2>&1)
    then
        log "building $MULTINODE_TAG failed:"
        printf '%s\n' "$out" >&2
        exit 1
    fi
    echo "built $MULTINODE_TAG (fake ray / vllm / sglang on $TAG)"
}

if docker image inspect "$TAG" >/dev/null 2>&1; then
    echo "image $TAG already exists"
    build_multinode
    exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
    log "building $TAG needs root (debootstrap); re-run with sudo"
    exit 1
fi

if [[ -n "${SPARKGATE_TEST_MIRROR:-}" ]]; then
    MIRROR="$SPARKGATE_TEST_MIRROR"
elif ! MIRROR=$(apt_mirror "$SUITE" "${APT_SOURCES[@]}"); then
    log "no apt source of this machine serves '$SUITE' (looked in ${APT_SOURCES[*]}):"
    log "set SPARKGATE_TEST_MIRROR to a Debian mirror that has it (or SPARKGATE_TEST_SUITE to a suite yours serve)"
    exit 1
fi

start=$(date +%s)

if ! command -v debootstrap >/dev/null 2>&1; then
    log "installing debootstrap"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
fi

workdir=$(mktemp -d /tmp/sparkgate-test-image.XXXXXX)
rootfs="$workdir/rootfs"

cleanup() {
    local rc=$? mnt
    # debootstrap mounts proc/sys (and, inside a container, bind-mounts the host's /dev)
    # into the target; if it died half-way those mounts may still be there. Never rm -rf
    # through them: unmount deepest first, then remove without crossing filesystems.
    if [[ -d "$workdir" ]]; then
        while read -r mnt; do
            umount -l "$mnt" 2>/dev/null || true
        done < <(awk -v p="$workdir/" 'index($2, p) == 1 { print $2 }' /proc/mounts | sort -r)
        rm -rf --one-file-system "$workdir"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log "debootstrap $SUITE ($PACKAGES) from $MIRROR into $rootfs"
if ! debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$MIRROR" \
        >"$workdir/debootstrap.log" 2>&1; then
    log "debootstrap failed; last lines of its log:"
    tail -n 30 "$workdir/debootstrap.log" >&2
    [[ -f "$rootfs/debootstrap/debootstrap.log" ]] && tail -n 30 "$rootfs/debootstrap/debootstrap.log" >&2
    exit 1
fi

# The image is only ever used to run python scripts: drop what is not needed for that.
log "trimming rootfs ($(du -sh --one-file-system "$rootfs" | cut -f1) before)"
rm -rf "$rootfs"/var/lib/apt/lists/* \
       "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin \
       "$rootfs"/var/cache/debconf/*-old "$rootfs"/var/lib/dpkg/*-old \
       "$rootfs"/var/log/* \
       "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
       "$rootfs"/usr/share/lintian "$rootfs"/usr/share/linda \
       "$rootfs"/debootstrap
# Translations: keep only locale.alias (the C / C.UTF-8 locales live in /usr/lib/locale).
if [[ -d "$rootfs/usr/share/locale" ]]; then
    find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
fi
if [[ -d "$rootfs/usr/lib/locale" ]]; then
    find "$rootfs/usr/lib/locale" -mindepth 1 -maxdepth 1 ! -name 'C.*' -exec rm -rf {} +
fi
# Keep dpkg from re-adding the trimmed files should anyone apt-get install in the image.
mkdir -p "$rootfs/etc/dpkg/dpkg.cfg.d"
cat >"$rootfs/etc/dpkg/dpkg.cfg.d/01-sparkgate-nodoc" <<'EOF'
path-exclude /usr/share/doc/*
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
# Container-friendly identity files; docker manages these at run time anyway.
: >"$rootfs/etc/hostname"
: >"$rootfs/etc/machine-id"
log "rootfs is $(du -sh --one-file-system "$rootfs" | cut -f1) after trimming"

log "importing as $TAG"
tar --numeric-owner --xattrs -C "$rootfs" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PYTHONUNBUFFERED=1' \
    --change 'ENV PYTHONDONTWRITEBYTECODE=1' \
    --change 'WORKDIR /' \
    --change 'CMD ["python3"]' \
    --message "sparkgate test engine image: debootstrap $SUITE minbase + $PACKAGES" \
    - "$TAG" >/dev/null

# Smoke test: the one thing the image is for.
version=$(docker run --rm "$TAG" python3 -c 'import sys, aiohttp; print(sys.version.split()[0], aiohttp.__version__)')

end=$(date +%s)
size=$(docker image inspect -f '{{.Size}}' "$TAG")
echo "built $TAG in $((end - start))s: python/aiohttp $version," \
     "image size $(numfmt --to=iec-i --suffix=B "$size") ($size bytes)"
build_multinode
