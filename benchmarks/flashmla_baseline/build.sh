#!/usr/bin/env bash
# Build FlashMLA's SM90 sparse prefill forward as a plain shared library with a C entry point (flashmla_capi.cu),
# on any machine with nvcc >= 12.8 (no GPU needed), for `python -m benchmarks.bench_cute_fwd_schedules --flashmla`.
#   FLASHMLA=/path/to/FlashMLA CUTLASS=/path/to/cutlass bash benchmarks/flashmla_baseline/build.sh [OUT_DIR]
# FLASHMLA: a checkout of github.com/deepseek-ai/FlashMLA (measured at 9241ae3); CUTLASS: the cutlass commit its
# csrc/cutlass submodule names (147f567 for 9241ae3). OUT_DIR defaults to .device/flashmla (git-ignored; carry it
# to the GPU machine). Takes a few minutes: four kernel instantiations (D 512 / 576, with / without topk_length).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/../../.device/flashmla}
: "${FLASHMLA:?set FLASHMLA to a FlashMLA checkout}" "${CUTLASS:?set CUTLASS to a cutlass checkout}"
mkdir -p "$out/obj"
src=$FLASHMLA/csrc
flags=(-O3 -std=c++20 -DNDEBUG -D_USE_MATH_DEFINES -Wno-deprecated-declarations --expt-relaxed-constexpr
       --expt-extended-lambda --use_fast_math -Xcompiler -fPIC -gencode arch=compute_90a,code=sm_90a
       -I"$src" -I"$src/kerutils/include" -I"$src/sm90" -I"$CUTLASS/include" -I"$CUTLASS/tools/util/include")
units=("$here/flashmla_capi.cu" "$src/sm90/prefill/sparse/fwd.cu"
       "$src"/sm90/prefill/sparse/instantiations/phase1_k{512,576}{,_topklen}.cu)
pids=()
for unit in "${units[@]}"; do
  nvcc "${flags[@]}" -c "$unit" -o "$out/obj/$(basename "$unit" .cu).o" & pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
nvcc -shared -cudart static -gencode arch=compute_90a,code=sm_90a "$out"/obj/*.o -o "$out/libflashmla_sm90_sparse_fwd.so"
rm -rf "$out/obj"
ls -la "$out/libflashmla_sm90_sparse_fwd.so"
