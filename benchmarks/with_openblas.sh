#!/usr/bin/env bash
# Run a command with Debian's OpenBLAS preloaded under MLX's CPU back end (Linux only).
# The mlx[cpu] wheel's bundled BLAS runs a large fp32 matmul ~10x slower than OpenBLAS, which
# would make every CPU benchmark measure that BLAS rather than the code around it.
#   benchmarks/with_openblas.sh python benchmarks/bench_msa.py
set -euo pipefail
dir="${M3MLX_OPENBLAS_DIR:-/tmp/m3mlx-openblas}"
lib="$dir/root/usr/lib/x86_64-linux-gnu"
if [ ! -e "$lib/openblas-pthread/libopenblas.so.0" ]; then
    mkdir -p "$dir"
    (cd "$dir" && apt-get download libopenblas0-pthread libgfortran5 >/dev/null 2>&1 \
        || { apt-get update -qq >/dev/null && apt-get download libopenblas0-pthread libgfortran5 >/dev/null; })
    for deb in "$dir"/*.deb; do dpkg -x "$deb" "$dir/root"; done
fi
export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LD_PRELOAD="$lib/openblas-pthread/libopenblas.so.0"
exec "$@"
