#!/usr/bin/env bash
# Run modelpress's kernel tests on an emulated ARM (AArch64) CPU: a Debian arm64 root under qemu-user, torch's
# aarch64 wheel from PyPI, this checkout's code, and the native kernels' portable build compiled there.
# Needs root (apt, debootstrap, binfmt_misc, chroot), ~6 GB of disk and PyPI + Debian mirrors; not part of CI (an
# hour to set up the first time on 2 cores, then a few minutes a run). Usage, from the repository root:
#   sudo tools/arm-emulated-tests.sh [pytest arguments]      (default: tests/quant tests/formats tests/nn -q)
# Environment: ROOT (the arm64 root, default /srv/arm), QEMU_CPU (default neoverse-n1: ARMv8.2 with NEON, as AWS
# Graviton 2 or Ampere Altra; qemu 7.2's "max" and "a64fx" CPUs compute torch's own bf16 depthwise convolution
# wrong, so they test qemu rather than modelpress).
set -euo pipefail
ROOT=${ROOT:-/srv/arm}
CPU=${QEMU_CPU:-neoverse-n1}
REPO=$(pwd)
WHL=$ROOT/tmp/whl
PY=cp311
PLAT="--platform manylinux_2_28_aarch64 --platform manylinux2014_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux_2_27_aarch64"

if [ ! -x "$ROOT/opt/venv/bin/python" ]; then
  apt-get install -y -q qemu-user-static debootstrap binfmt-support
  [ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  debootstrap --arch=arm64 --include=python3,python3-venv,python3-dev,g++,make bookworm "$ROOT" http://deb.debian.org/debian
  mkdir -p "$WHL"
  dl() { env PIP_CONSTRAINT= pip download -q --only-binary=:all: $PLAT --python-version 3.11 --implementation cp -d "$WHL" "$@"; }
  dl torch==2.13.0 --no-deps
  dl numpy safetensors pyyaml rich ninja pytest hypothesis filelock typing-extensions sympy networkx jinja2 fsspec
  # torch's aarch64 wheel on PyPI is a CUDA build: its libraries must be present to import it, even on a CPU
  for r in "nvidia-cudnn-cu13==9.20.0.48" "nvidia-cusparselt-cu13" "nvidia-nccl-cu13" "nvidia-nvshmem-cu13" \
           "nvidia-cuda-runtime>=13,<14" "nvidia-cufft>=12,<13" "nvidia-curand>=10,<11" "nvidia-cusolver>=12,<13" \
           "nvidia-cusparse>=12,<13" "nvidia-nvjitlink>=13,<14" "nvidia-cufile" "nvidia-nvtx>=13,<14"; do
    dl --no-deps "$r"
  done
  chroot "$ROOT" /bin/bash -c "python3 -m venv /opt/venv && unset PIP_FIND_LINKS PIP_CONSTRAINT && \
    /opt/venv/bin/pip install -q --no-index --find-links /tmp/whl --no-deps /tmp/whl/*.whl"
  # libcupti has no aarch64 wheel on the mirror: a stub with the symbols (and symbol version) torch links against;
  # never called on a CPU
  syms=$(for f in "$ROOT"/opt/venv/lib/python3.11/site-packages/torch/lib/*.so*; do
           readelf -W --dyn-syms "$f" | awk '$7=="UND" && $8 ~ /@libcupti/ {sub(/@.*/, "", $8); print $8}'; done | sort -u)
  for s in $syms; do echo "int $s(void){return 1;}"; done > "$ROOT/tmp/cupti_stub.c"
  echo "libcupti.so.13 { global: $(printf '%s; ' $syms) local: *; };" > "$ROOT/tmp/cupti.map"
  chroot "$ROOT" /bin/bash -c "gcc -shared -fPIC -o /usr/local/lib/libcupti.so.13 -Wl,-soname,libcupti.so.13 \
    -Wl,--version-script=/tmp/cupti.map /tmp/cupti_stub.c && ldconfig"
  # cpuinfo (torch) reads the CPU list from sysfs: a two-core Neoverse-N1 (the host's own sysfs crashes it)
  S=$ROOT/sys/devices/system/cpu
  mkdir -p "$S" && for f in possible present online; do echo 0-1 > "$S/$f"; done
  for c in 0 1; do
    mkdir -p "$S/cpu$c/regs/identification"
    echo 0x00000000413fd0c1 > "$S/cpu$c/regs/identification/midr_el1"
  done
  mountpoint -q "$ROOT/proc" || mount --bind /proc "$ROOT/proc"
  mountpoint -q "$ROOT/dev" || mount --bind /dev "$ROOT/dev"
fi
rm -rf "$ROOT/opt/mp" && git clone -q "$REPO" "$ROOT/opt/mp"
echo /opt/mp/src > "$ROOT/opt/venv/lib/python3.11/site-packages/mp.pth"
args=${*:-tests/quant tests/formats tests/nn -q}
chroot "$ROOT" /bin/bash -c "cd /opt/mp && export OMP_NUM_THREADS=1 QEMU_CPU=$CPU && \
  /opt/venv/bin/python -m pytest -p no:logging -p no:cacheprovider $args"
