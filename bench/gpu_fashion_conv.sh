#!/usr/bin/env bash
# The GPU run of bench/gpu_fashion_conv.py: prepared here, run on the lent device.
#
#   bash bench/gpu_fashion_conv.sh prepare         here, once: fill gpu_carry/ (git-ignored)
#   bash bench/gpu_fashion_conv.sh run [ARGS...]   on the device: install the carried wheels,
#                                                  unpack the data, train + evaluate into $OUT
#
# prepare needs pip with access to the package index and Fashion-MNIST's raw files under
# $PYRO_HVAE_DATA (default ../shared/data). The device has no network and its image lacks
# pyro-ppl, arviz, pydantic and their dependencies listed below (its Python is 3.12); the
# wheels and the data travel as gpu_carry/ (about 35 MB of the 64 MiB a call may carry):
#   run(command="bash bench/gpu_fashion_conv.sh run", carry=["gpu_carry"], timeout_s=600)
# ARGS go to bench/gpu_fashion_conv.py (e.g. --minutes 6, or KEY=VALUE overrides).
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=gpu_carry
WHEELS=(
    pyro-ppl==1.9.2 pyro-api==0.1.2
    arviz==0.23.4 xarray-einstats==0.9.1 h5netcdf==1.8.2 platformdirs==4.14.9
    pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2
    typing-extensions==4.15.0
)

prepare() {
    local data="${PYRO_HVAE_DATA:-../shared/data}"
    if [[ ! -f "$data/FashionMNIST/raw/train-images-idx3-ubyte" ]]; then
        echo "error: no Fashion-MNIST under $data/FashionMNIST/raw; set PYRO_HVAE_DATA to the data folder" >&2
        exit 2
    fi
    rm -rf "$CARRY"
    mkdir -p "$CARRY/wheels"
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$CARRY/wheels" "${WHEELS[@]}"
    tar -czf "$CARRY/FashionMNIST.tar.gz" -C "$data" FashionMNIST/raw
    du -sh "$CARRY"
}

run() {
    if [[ ! -d "$CARRY/wheels" || ! -f "$CARRY/FashionMNIST.tar.gz" ]]; then
        echo "error: $CARRY/ is missing or incomplete; run 'bash bench/gpu_fashion_conv.sh prepare' here and carry $CARRY" >&2
        exit 2
    fi
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$CARRY"/wheels/*.whl
    export PYTHONPATH="/tmp/site:$PWD" PYRO_HVAE_DATA=/tmp/pyro-hvae-data PYTHONUNBUFFERED=1
    mkdir -p "$PYRO_HVAE_DATA"
    tar -xzf "$CARRY/FashionMNIST.tar.gz" -C "$PYRO_HVAE_DATA"
    local out="${OUT:-gpu-out}"
    mkdir -p "$out"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    python3 bench/gpu_fashion_conv.py --out "$out" "$@" 2>&1 | tee "$out/gpu_fashion_conv.log"
}

case "${1:-}" in
    prepare) prepare ;;
    run) shift; run "$@" ;;
    *) echo "usage: bash bench/gpu_fashion_conv.sh prepare | run [ARGS for bench/gpu_fashion_conv.py]" >&2; exit 2 ;;
esac
