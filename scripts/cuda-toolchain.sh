#!/usr/bin/env bash
# Brings the CUDA 13.0 compiler, headers and libraries my-claw's `cuda` feature needs from
# PyPI's NVIDIA wheels into a cache directory (never system-wide), then prints the
# environment that uses them. Source it, or eval its output:
#   eval "$(./scripts/cuda-toolchain.sh compile)"   # nvcc + headers: enough for `cargo check`
#   eval "$(./scripts/cuda-toolchain.sh full)"      # + cuBLAS, cuRAND, NVRTC: build and run
#
# Why 13.0: candle 0.11 asks cudarc 0.19 to read the toolkit version from `nvcc --version`,
# and cudarc knows 11.4 to 13.4; the 13.x `nvidia-cuda-nvcc` wheels carry the `nvcc` driver
# (the 12.x ones only ptxas), and a 13.0 PTX loads on every driver of the 580 series on.
# The GPU driver itself (libcuda.so.1) is the one thing a user must install: it comes with
# the NVIDIA driver, never from here. For linking without a driver this script writes a
# stub libcuda.so (every function of cuda.h, each returning an error) into lib/stubs, the
# same arrangement as the toolkit's own stubs; the real driver is found at run time.
set -euo pipefail
mode=${1:-full}
root=${MY_CLAW_CUDA_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/my-claw/cuda-13.0}
home="$root/nvidia/cu13"

# nvcc's driver, its front end (cicc, in nvvm), its crt headers, the C++ library (cccl)
# and the runtime's headers: the 13.x toolkit is split over these wheels.
compile_wheels=("nvidia-cuda-nvcc==13.0.88" "nvidia-nvvm==13.0.88" "nvidia-cuda-crt==13.0.88"
  "nvidia-cuda-cccl==13.0.85" "nvidia-cuda-runtime==13.0.96")
full_wheels=("nvidia-cublas==13.0.2.14" "nvidia-curand==10.4.0.35" "nvidia-cuda-nvrtc==13.0.88")

case "$mode" in
  compile) wanted=("${compile_wheels[@]}") ;;
  full) wanted=("${compile_wheels[@]}" "${full_wheels[@]}") ;;
  *) echo "usage: $0 compile|full" >&2; exit 2 ;;
esac

missing=()
for wheel in "${wanted[@]}"; do
  [ -e "$root/.installed-${wheel%%==*}" ] || missing+=("$wheel")
done
if [ ${#missing[@]} -gt 0 ]; then
  python3 -m pip --version >/dev/null 2>&1 || { echo "python3 -m pip is missing (scripts/install-deps.sh installs it)" >&2; exit 1; }
  echo "installing ${wanted[*]} into $root" >&2
  # All in one pip call into a fresh directory: `pip install --target` replaces a top-level
  # folder (`nvidia/`) that a later call also brings, so wheels installed one by one would
  # remove each other's files.
  rm -rf "$root"
  mkdir -p "$root"
  python3 -m pip install --quiet --disable-pip-version-check --no-deps \
    --target "$root" "${wanted[@]}" >&2
  for wheel in "${wanted[@]}"; do touch "$root/.installed-${wheel%%==*}"; done
fi

# The linker looks for the unversioned names; the wheels ship only the versioned ones.
for lib in "$home"/lib/*.so.*; do
  [ -e "$lib" ] || continue
  base=$(basename "$lib")
  plain="${base%%.so.*}.so"
  [ -e "$home/lib/$plain" ] || ln -s "$base" "$home/lib/$plain"
done

if [ "$mode" = full ] && [ ! -e "$home/lib/stubs/libcuda.so" ]; then
  command -v cc >/dev/null || { echo "a C compiler is missing (scripts/install-deps.sh installs it)" >&2; exit 1; }
  mkdir -p "$home/lib/stubs"
  # Every driver function cuda.h declares (after its versioning macros), as a stub.
  cc -E -P -I"$home/include" -x c "$home/include/cuda.h" 2>/dev/null \
    | grep -oE '\bCUresult[[:space:]]+(CUDAAPI[[:space:]]+)?cu[A-Za-z0-9_]+[[:space:]]*\(' \
    | grep -oE 'cu[A-Za-z0-9_]+[[:space:]]*\($' | tr -d '( ' | sort -u \
    | awk '{ printf "int %s(void) { return 999; }\n", $1 }' > "$home/lib/stubs/libcuda.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$home/lib/stubs/libcuda.so" "$home/lib/stubs/libcuda.c"
fi

echo "export CUDA_HOME='$home'"
echo "export PATH='$home/bin':\"\$PATH\""
echo "export CUDARC_CUDA_VERSION=13000"
# candle's kernels compile one file per thread, half the cores by default: all of them.
echo "export CUDAFORGE_THREADS=\${CUDAFORGE_THREADS:-$(nproc)}"
if [ "$mode" = full ]; then
  # cuBLAS, cuRAND and NVRTC from the cache at run time; the driver from the system.
  echo "export LD_LIBRARY_PATH='$home/lib'\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
fi
