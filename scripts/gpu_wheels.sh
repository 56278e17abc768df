#!/usr/bin/env bash
# Wheels (Python 3.12, manylinux x86_64) of the packages the GPU session's benchmarks compare against that the
# device image lacks, into .whl/ (git-ignored; name it in the device call's carry). Dependencies are not fetched:
# torch, triton, numpy and packaging are in the image. About 45 MB, under the 64 MiB a call may carry.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
rm -rf .whl
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
    -d .whl "bitsandbytes==0.50.2" "liger-kernel==0.8.5" "pytorch-optimizer==4.1.0"
du -sh .whl
ls .whl
