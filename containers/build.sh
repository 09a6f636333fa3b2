#!/usr/bin/env bash
# `make image`: builds the Containerfile into herd:<version>-<flavour> with docker (when its daemon answers) or
# buildah. Settings, all optional, from the environment:
#   FLAVOR   cpu (default: the dev profile, CI) or cuda (the GPU profiles)
#   IMAGE    the image name (default herd:<version>-<flavour>), e.g. registry.example.com/herd:0.1.0-cuda
#   BASE     the base image; default: cpu with docker: python:3.11-slim-bookworm; cpu with buildah: a Debian made
#            here by containers/base.sh (no registry needed); cuda: NVIDIA's CUDA 13.0 runtime on Ubuntu 24.04
#   ENGINE   docker or buildah (default: docker if its daemon answers, else buildah)
# On a machine whose pip needs its CA bundle or finds torch in a local directory (pip config's cert and
# find-links), buildah mounts them read-only for the build; they are never copied into the image.
set -euo pipefail
cd "$(dirname "$0")/.."
flavor="${FLAVOR:-cpu}"
case "$flavor" in cpu|cuda) ;; *) echo "FLAVOR must be cpu or cuda, not '$flavor'" >&2; exit 2 ;; esac
version="$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' herd/__init__.py)"
image="${IMAGE:-herd:${version}-${flavor}}"
revision="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
source="$(git config --get remote.origin.url 2>/dev/null || true)"

engine="${ENGINE:-}"
if [[ -z "$engine" ]]; then
    if command -v docker >/dev/null && docker info >/dev/null 2>&1; then engine=docker
    elif command -v buildah >/dev/null; then engine=buildah
    else echo "make image needs docker (with a running daemon) or buildah" >&2; exit 2
    fi
fi

base="${BASE:-}"
if [[ -z "$base" ]]; then
    if [[ "$flavor" == cuda ]]; then base=docker.io/nvidia/cuda:13.0.2-runtime-ubuntu24.04
    elif [[ "$engine" == docker ]]; then base=docker.io/library/python:3.11-slim-bookworm
    else base=localhost/herd-base:bookworm; BASE_IMAGE="$base" bash containers/base.sh
    fi
fi

args=(--build-arg "BASE=$base" --build-arg "VERSION=$version" --build-arg "REVISION=$revision"
      --build-arg "FLAVOR=$flavor" --build-arg "SOURCE=$source")
if [[ "$flavor" == cuda ]]; then
    args+=(--build-arg HERD_EXTRAS=gpu --build-arg TORCH_INDEX_URL=)
fi
if [[ "$engine" == buildah ]]; then
    pip_value() { python3 -m pip config list 2>/dev/null | sed -n "s/^[a-z:.]*$1='\(.*\)'$/\1/p" | head -1; }
    cert="$(pip_value cert)"
    if [[ -n "$cert" && -f "$cert" ]]; then
        args+=(-v "$cert:/etc/herd-build/ca.crt:ro" --build-arg PIP_CERT=/etc/herd-build/ca.crt)
    fi
    links="$(pip_value find-links)"
    if [[ "$flavor" == cpu && -n "$links" && -n "$(ls "$links"/torch-"$(sed -n 's/.*"torch==\([^"]*\)".*/\1/p' pyproject.toml)"+cpu-*.whl 2>/dev/null)" ]]; then
        # torch's CPU wheel is on this disk: no download of it, and no CPU index needed.
        args+=(-v "$links:/etc/herd-build/wheels:ro" --build-arg PIP_FIND_LINKS=/etc/herd-build/wheels
               --build-arg TORCH_INDEX_URL=)
    fi
fi

echo "building $image ($flavor) from $base with $engine"
start=$(date +%s)
if [[ "$engine" == docker ]]; then
    docker build -f Containerfile -t "$image" "${args[@]}" .
else
    buildah build --layers --network host -f Containerfile -t "$image" "${args[@]}" .
fi
echo "built $image in $(( $(date +%s) - start )) s"
