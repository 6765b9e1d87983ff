#!/usr/bin/env bash
# One-command set-up on a fresh Debian 12 machine (root, package registries only). Idempotent:
# every stage checks whether its result is already there, so a second run takes seconds.
#
#   1. system packages: Open MPI (runtime + headers), compiler, cmake, Slurm (local test cluster)
#   2. .venv on python3.11 with the pinned requirements.txt
#   3. Horovod 0.28.1 built from its PyPI sdist against the installed torch (C++17 patch,
#      docs/design.md, "Dependencies"), the wheel cached outside the repository
#   4. a check that horovod.torch imports and was built with MPI
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
HOROVOD_VERSION=0.28.1
CACHE_DIR="${HUNDREDM_CACHE:-$HOME/.cache/hundredm}"
STAMP="$VENV/.requirements.sha256"

log() { echo "[setup] $*"; }
die() { echo "[setup] error: $*" >&2; exit 1; }

APT_PACKAGES=(openmpi-bin libopenmpi-dev libpmix-dev g++ make cmake slurmctld slurmd slurm-client
              slurm-wlm-basic-plugins hostname)

install_system_packages() {
    local missing=()
    for pkg in "${APT_PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && { log "system packages present"; return; }
    [ "$(id -u)" -eq 0 ] || die "missing system packages (${missing[*]}); run 'make setup' as root or install them"
    log "installing system packages: ${missing[*]}"
    # Keep the Slurm daemons from starting as services during the install: tests run their own
    # cluster in a temporary directory (docs/design.md, "Dependencies").
    local policy=/usr/sbin/policy-rc.d created_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod +x "$policy"; created_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    [ $created_policy -eq 1 ] && rm -f "$policy"
    return 0
}

find_python() {
    for cand in python3.11 /usr/bin/python3.11 python3; do
        if command -v "$cand" >/dev/null 2>&1 \
           && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
            command -v "$cand"; return
        fi
    done
    die "python3.11 not found; install it (apt-get install python3.11 python3.11-venv)"
}

create_venv() {
    if [ ! -x "$PY" ]; then
        local base; base="$(find_python)"
        log "creating $VENV with $base"
        "$base" -m venv "$VENV" || die "could not create $VENV (apt-get install python3.11-venv?)"
    fi
    local want; want="$(sha256sum "$ROOT/requirements.txt" | cut -d' ' -f1)"
    if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
        log "requirements up to date"; return
    fi
    log "installing requirements.txt"
    "$PY" -m pip install -q --upgrade pip wheel setuptools
    "$PY" -m pip install -q -r "$ROOT/requirements.txt"
    echo "$want" > "$STAMP"
}

build_horovod() {
    if "$PY" -c "import horovod, sys; sys.exit(horovod.__version__ != '$HOROVOD_VERSION')" 2>/dev/null; then
        log "horovod $HOROVOD_VERSION installed"; return
    fi
    local torch_version pyver gpu key wheel_dir
    torch_version="$("$PY" -c 'import torch; print(torch.__version__.replace("+", "_"))')"
    pyver="$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
    gpu="$("$PY" -c 'import torch; print("cuda" if torch.version.cuda and torch.cuda.is_available() else "cpu")')"
    key="horovod-$HOROVOD_VERSION-torch-$torch_version-$pyver-$gpu"
    wheel_dir="$CACHE_DIR/wheels/$key"
    if ! ls "$wheel_dir"/horovod-*.whl >/dev/null 2>&1; then
        log "building Horovod $HOROVOD_VERSION against torch $torch_version (takes ~7 min on 2 cores)"
        local work; work="$(mktemp -d)"
        "$PY" -m pip download -q --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$work"
        tar -xzf "$work"/horovod-*.tar.gz -C "$work"
        local src="$work/horovod-$HOROVOD_VERSION"
        # torch >= 2.1 headers need C++17; Horovod 0.28.1 pins C++14 (fixed upstream after release).
        sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' \
            "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
        grep -q 'CMAKE_CXX_STANDARD 17' "$src/horovod/torch/CMakeLists.txt" \
            || die "C++17 patch did not apply to $src/horovod/torch/CMakeLists.txt"
        local -a flags=(HOROVOD_WITH_MPI=1 HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1
                        HOROVOD_WITHOUT_MXNET=1 HOROVOD_WITHOUT_GLOO=1)
        if [ "$gpu" = cuda ]; then
            flags+=(HOROVOD_GPU_OPERATIONS=NCCL)
            log "torch has CUDA: building Horovod's NCCL operations"
        fi
        mkdir -p "$wheel_dir"
        (cd "$src" && env "${flags[@]}" MAKEFLAGS="-j$(nproc)" \
            "$PY" -m pip wheel -q --no-build-isolation --no-deps . -w "$work/dist") \
            || die "Horovod build failed (log above); is libopenmpi-dev installed?"
        mv "$work"/dist/horovod-*.whl "$wheel_dir/"
        rm -rf "$work"
    else
        log "installing cached Horovod wheel from $wheel_dir"
    fi
    "$PY" -m pip install -q --no-deps "$wheel_dir"/horovod-*.whl
}

check_horovod() {
    "$PY" - <<'PYEOF' || die "horovod.torch is not usable with MPI; remove the cached wheel under $CACHE_DIR/wheels and rerun"
import horovod.torch as hvd
assert hvd.mpi_built(), "Horovod was built without MPI"
print(f"[setup] horovod.torch ok: mpi_built={hvd.mpi_built()} nccl_built={bool(hvd.nccl_built())}")
PYEOF
}

install_system_packages
create_venv
build_horovod
check_horovod
log "done"
