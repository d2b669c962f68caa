#!/usr/bin/env bash
# One lent-GPU session in phases, each one `run` call (after the staging calls of ../shared/device/README.md):
#   source .device/s3/stage.sh && bash tools/device_session.sh cute       # CuTe-DSL tests + kernel benchmarks
#   source .device/s3/stage.sh && bash tools/device_session.sh bench      # benchmarks.run --headline, --quick
#   source .device/s3/stage.sh && bash tools/device_session.sh recheck [pytest args]  # CuTe bwd, top-k + tests
#   source .device/s3/stage.sh && bash tools/device_session.sh verify [pytest args]   # examples + tests
#   bash tools/device_session.sh profile                                 # ncu on top-k, top-k tests (no staging)
#   bash tools/device_session.sh topk                                    # top-k settings sweep + GPU tests
#   source .device/s3/stage.sh && bash tools/device_session.sh full [pytest args]     # top-k vs cuDNN, tests, suite
#   source .device/s3/stage.sh && bash tools/device_session.sh suite                  # top-k vs cuDNN, whole suite
#   source .device/s3/stage.sh && bash tools/device_session.sh bwdprof [pytest args]  # CuTe bwd ablations + ncu
# Before the CuTe phases, on the CPU machine, with a Python 3.12 like the GPU machine's (the cache key holds the
# Python version): python -m tools.warm_cute_cache --dir .device/cute_cache (about 10 MB for the device set, 4 min
# on 2 cores), then carry ".device/cute_cache" with the third staging call.
#   source .device/s3/stage.sh && bash tools/device_session.sh cutebwd   # CuTe bwd wide schedule: tests, kernels
#   source .device/s3/stage.sh && bash tools/device_session.sh cutebwdop # then the op (wide) vs cuDNN
#   source .device/s3/stage.sh && bash tools/device_session.sh bwdcheck               # CuTe bwd tests + vs cuDNN
#   source .device/s3/stage.sh && bash tools/device_session.sh bwdncu                 # CuTe bwd ncu at H = 64
#   source .device/s3/stage.sh && bash tools/device_session.sh layouts   # top-k tests, indexer MMA layouts vs cuDNN
#   source .device/s3/stage.sh && bash tools/device_session.sh score     # score-op launch settings vs cuDNN + tests
#   source .device/s3/stage.sh && bash tools/device_session.sh detcheck  # CuTe bwd tests, deterministic modes
#   source .device/s3/stage.sh && bash tools/device_session.sh cutefwd   # CuTe fwd tests, op graphs, demo, timings
#   source .device/s3/stage.sh && bash tools/device_session.sh flashmla  # CuTe fwd vs FlashMLA (carry .device/flashmla)
#   bash tools/device_session.sh tritonbwd                               # Triton fwd/bwd tests, bwd timings, ncu
# (The phases of single experiments, named after their session, were removed in session 23; each one's command
# is in BENCHMARKS.md next to its numbers, and `git log -p tools/device_session.sh` has them all.)
# The full suite (`python -m benchmarks.run --also-backends triton`, 169 cases) ran in one call in 332 s (19:35 UTC,
# 2026-11-25). The GPU is an H200 since 2026-12-04; `bwdcheck` there (197 s) measured BwdConfig.dkv_write
# "vector" 8-9% faster than "tiled" and made it the default (BENCHMARKS.md). Set DKV_MICRO=1 for the L2
# reduction microbenchmark too. Session 6 (2026-12-04) added `layouts` (top-k tests + the indexer MMA-layout
# experiment), `score` (score-op launch settings) and `detcheck` (the backward's deterministic modes).
# Session 8 (2026-12-05, H100) ran the CuTe-DSL score kernel for the first time (`score`, then `scoreops`): it is
# now the SM90 row of sparse_attn_score and dense_attn_score (BENCHMARKS.md).
# The GPU machine drew plots (matplotlib was importable there on 2026-11-25); if it is not, carry wheels for
# Python 3.12 with s3: `pip download matplotlib --python-version 3.12 --only-binary=:all: --platform
# manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d .device/mpl` (drop the numpy wheel, it is there), then
# `pip install --no-index --no-deps --target /opt/mpl .device/mpl/*.whl` and add /opt/mpl to PYTHONPATH.
# Every command has a wall-clock cap (a hung kernel costs its cap, not the call); logs go to $OUT.
# The dispatch is never forced here: a forced backend makes every call it cannot run (CPU, fp64) an error.
set -uo pipefail
OUT=${OUT:-device-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
phase=${1:?phase: cutebwd | cutebwdop | cutefwd | flashmla | tritonbwd | headline | scoreops | detcheck | score | layouts | cute | bench | recheck | profile | topk | full | suite | bwdprof | bwdncu | bwdcheck | verify}; shift || true

capped() {  # capped SECONDS LOGNAME cmd...: run, tee the log, show its tail
  local secs=$1 log=$2; shift 2
  echo "== [$(date +%T)] $* (cap ${secs}s)"
  timeout -s KILL "$secs" "$@" > "$OUT/$log" 2>&1; local rc=$?
  tail -n 25 "$OUT/$log"; echo "== rc=$rc"
  return $rc
}

ncu_report() {  # ncu_report NAME TOP: from $OUT/NAME.ncu-rep, the details page and its key metrics, the SASS samples
                # summed by opcode (TOP rows), the gzipped SASS csv; the report itself is removed (large)
  local name=$1 top=$2
  ncu -i "$OUT/$name.ncu-rep" --page details > "$OUT/ncu_${name}_details.txt" 2>&1
  ncu -i "$OUT/$name.ncu-rep" --page source --csv --print-source sass > "$OUT/ncu_${name}_sass.csv" 2>&1
  grep -E "Duration|Throughput|Registers|Occupancy|Issued Ipc|No Eligible|Warp Cycles Per Issued|L2 Hit|Stall" \
    "$OUT/ncu_${name}_details.txt" | head -40
  python -m tools.ncu_samples "$OUT/ncu_${name}_sass.csv" --top "$top" > "$OUT/ncu_${name}_samples.txt" 2>&1
  head -60 "$OUT/ncu_${name}_samples.txt"
  gzip -f "$OUT/ncu_${name}_sass.csv"; rm -f "$OUT/$name.ncu-rep"
}

bwd_ncu() {  # ncu (full set) of the CuTe-DSL backward at H = 64, its key metrics and warp-state samples by opcode
  capped 240 ncu_bwd.log ncu --clock-control none -k regex:SparseAttentionBwdSm90 --launch-skip 2 --launch-count 1 \
    --set full -f -o "$OUT/bwd_h64" python -m tools.profile_bwd 64 4096
  ncu_report bwd_h64 25
}

pip install -e . --no-deps --no-build-isolation -q 2>&1 | tail -2
# CuTe-DSL kernels compiled ahead on the CPU machine (`python -m tools.warm_cute_cache --dir .device/cute_cache`,
# carried with the call): loaded instead of compiled here
if [ -d .device/cute_cache ]; then
  export DSA_OPS_CUTE_CACHE_DIR="$PWD/.device/cute_cache"
  # the cache key's fingerprint holds the Python version: warm it with the GPU machine's (3.12) or nothing loads
  python -c "from csrc_dsl.cute.sm90.sparse_attention_bwd import _CACHE as c; d = c.directory
print('cute cache:', d, 'found' if d.is_dir() else 'NOT FOUND (every kernel compiles here)')" 2>&1 | tail -1
fi

case "$phase" in
tritonbwd)  # no staging, at most 480 s (session 22's s22b): the Triton forward's and backward's GPU tests; the
            # backward's defaults timed in both modes; an ncu profile of the dkv kernel at H = 64 (how close its fp32
            # reductions run to L2's rate)
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
  capped 130 triton_bwd_tests.log python -m pytest -q -p no:cacheprovider -rfE tests/test_triton_sparse_attention_bwd.py
  capped 110 triton_fwd_tests.log python -m pytest -q -p no:cacheprovider -rfE tests/test_triton_sparse_attention_fwd.py
  capped 100 triton_bwd_default.log python -m benchmarks.bench_sparse_attention_bwd --heads 64,128 --no-baseline \
    --profile --modes fast,deterministic --configs default
  capped 150 ncu_dkv.log ncu --clock-control none -k regex:_dkv_kernel --launch-skip 2 --launch-count 1 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables \
    --section WarpStateStats --section Occupancy --section LaunchStats -f -o "$OUT/dkv_h64" \
    python -m benchmarks.bench_sparse_attention_bwd --heads 64 --no-baseline --modes fast --configs default
  ncu -i "$OUT/dkv_h64.ncu-rep" --page details > "$OUT/ncu_dkv_h64_details.txt" 2>&1
  ncu -i "$OUT/dkv_h64.ncu-rep" --page raw --csv 2>/dev/null | gzip > "$OUT/ncu_dkv_h64_raw.csv.gz"
  rm -f "$OUT/dkv_h64.ncu-rep"
  grep -E "Duration|Throughput|Registers|Occupancy|L2|lts|Stall|Issued|Eligible" "$OUT/ncu_dkv_h64_details.txt" | head -60
  ;;
flashmla)  # our forward and FlashMLA's SM90 sparse prefill side by side, interleaved on the same inputs (carry
           # .device/flashmla, built on the CPU by benchmarks/flashmla_baseline/build.sh); FLASHMLA_VARIANTS: the
           # CuTe variants to time (default: the op's), FLASHMLA_CASES, FLASHMLA_REPS, FLASHMLA_IDS
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
  for ids in ${FLASHMLA_IDS:-random sorted}; do
    capped 240 "fwd_vs_flashmla_$ids.log" python -m benchmarks.bench_cute_fwd_schedules --ids "$ids" \
      --variants "${FLASHMLA_VARIANTS:-}" --no-triton --cases "${FLASHMLA_CASES:-all}" --reps "${FLASHMLA_REPS:-50}" \
      --flashmla .device/flashmla/libflashmla_sm90_sparse_fwd.so
  done
  ;;
cutefwd)  # staged, at most ~450 s (session 23): the op's variant and CUTEFWD_VARIANTS (default: plain seesaw) timed
          # against Triton at the cases with CUTEFWD_HEADS, the demo, then the CuTe-DSL forward's GPU tests
          # (CUTEFWD_TESTS: by default every one but the CPU compile tests) and, unless CUTEFWD_SKIP_OP, the op-level
          # compile and graph tests
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
  capped 120 fwd_variants.log python -m benchmarks.bench_cute_fwd_schedules --cases all --reps 20 \
    --heads "${CUTEFWD_HEADS:-16,32,64,128}" \
    --variants "seesaw+persistent_dynamic+hoisted_addresses,${CUTEFWD_VARIANTS:-seesaw}"
  capped 40 demo.log python -m dsa_ops
  capped 160 cute_fwd_pytest.log python -m pytest -q -p no:cacheprovider -rfE tests/test_cute_sm90.py \
    -k "${CUTEFWD_TESTS:-not compile and not spills}"
  [ -n "${CUTEFWD_SKIP_OP:-}" ] && exit 0
  capped 80 op_pytest.log python -m pytest -q -p no:cacheprovider -rfE tests/test_dispatch.py \
    compile_tests/test_compile.py compile_tests/test_examples.py -k "graph or cuda or dispatch"
  ;;
cute)
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
  python -m dsa_ops.backends > "$OUT/backends.txt" 2>&1
  if capped 300 cute_bwd_pytest.log python -m pytest -q -p no:cacheprovider -rfE tests/test_cute_sm90_bwd.py; then
    capped 60 cute_bwd_bench.log python -m csrc_dsl.cute.sm90.sparse_attention_bwd
    capped 60 cute_bwd_bench_det.log python -m csrc_dsl.cute.sm90.sparse_attention_bwd --deterministic --no-triton
  fi
  capped 150 cute_fwd_pytest.log python -m pytest -q -p no:cacheprovider -rfE tests/test_cute_sm90.py
  capped 90 topk_sweep.log python -m benchmarks.bench_topk --sweep "$@"
  ;;
bench)
  capped 290 bench_headline.log python -m benchmarks.run --headline --also-backends triton --out "$OUT/headline" "$@"
  capped 280 bench_quick.log python -m benchmarks.run --quick --max-seconds 230 --out "$OUT/quick" "$@"
  ;;
recheck)   # after fixes: the CuTe-DSL backward and top-k tests, then the given test files
  capped 150 cute_bwd_pytest.log python -m pytest -q -p no:cacheprovider -rfE tests/test_cute_sm90_bwd.py
  capped 240 topk_pytest.log python -m pytest -q -p no:cacheprovider -rfE tests/test_triton_topk.py
  capped 230 pytest_subset.log python -m pytest -q -p no:cacheprovider -rfE "$@"
  ;;
profile)   # no staging needed: ncu on the top-k kernel at both target shapes, then the top-k GPU tests
  for cols in 8192 65536; do
    capped 120 ncu_topk_$cols.log ncu -k regex:_stream_topk_kernel --launch-skip 3 --launch-count 1 --set full \
      --import-source yes -f -o "$OUT/topk_$cols" python -m tools.profile_topk 4096 $cols 2048
    ncu -i "$OUT/topk_$cols.ncu-rep" --page details > "$OUT/ncu_topk_${cols}_details.txt" 2>&1
    ncu -i "$OUT/topk_$cols.ncu-rep" --page source --csv --print-source sass > "$OUT/ncu_topk_${cols}_sass.csv" 2>&1
    grep -E "Duration|Throughput|Registers|Achieved Occupancy|Theoretical Occupancy|Issued Ipc|No Eligible|Warp Cycles Per Issued" \
      "$OUT/ncu_topk_${cols}_details.txt" | head -30
  done
  capped 260 topk_pytest.log python -m pytest -q -p no:cacheprovider -rfE tests/test_triton_topk.py
  ;;
topk)      # no staging needed: top-k launch/select settings, then its GPU tests (the small-shape ones are slow)
  capped 240 topk_sweep.log python -m benchmarks.bench_topk --sweep
  capped 240 topk_gpu_pytest.log python -m pytest -q -p no:cacheprovider -rfE tests/test_triton_topk.py -k gpu
  ;;
full|suite)  # staged: top-k against cuDNN, the given tests (full only), then every op of the benchmark suite
  capped 90 topk_bench.log python -m benchmarks.bench_topk
  suite_seconds=420   # the whole suite took 330 s on the H100 and on the H200
  if [ $# -gt 0 ]; then
    capped 150 pytest_subset.log python -m pytest -q -p no:cacheprovider -rfE "$@"; suite_seconds=270
  fi
  capped $((suite_seconds + 50)) bench_full.log python -m benchmarks.run --also-backends triton \
    --max-seconds "$suite_seconds" --out "$OUT/full"
  ;;
bwdprof)   # staged: where the CuTe-DSL backward's time goes (ablations at three H), then ncu at H = 64
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
  capped 200 bwd_ablation.log python -m csrc_dsl.cute.sm90.sparse_attention_bwd --H 16 64 128 --no-triton \
    --ablation none kernel no_dkv_write no_dkv
  bwd_ncu
  if [ $# -gt 0 ]; then capped 150 pytest_subset.log python -m pytest -q -p no:cacheprovider -rfE "$@"; fi
  ;;
bwdncu)    # staged: ncu of the CuTe-DSL backward at H = 64 (bwd_ncu above)
  bwd_ncu
  ;;
cutebwd)   # staged, at most ~500 s: the CuTe backward's GPU tests (the whole file; wide is the default since
           # session 25), then its kernels alone against the split schedule, with ablations, at H = 64 and 128 (D = 576)
  capped 300 cute_bwd_pytest.log python -m pytest -q -p no:cacheprovider -rfE tests/test_cute_sm90_bwd.py "$@"
  capped 240 bwd_ablation.log python -m csrc_dsl.cute.sm90.sparse_attention_bwd --H 64 128 --no-triton \
    --ablation ${CUTEBWD_VARIANTS:-kernel split wide_uniform wide_uniform_p40 wide_p40 wide_overlap wide_64B \
    wide_no_dkv_write wide_no_dkv}
  ;;
cutebwdop) # staged, at most ~560 s, right after cutebwd: the default against split at D = 512 and at H = 16 / 32
           # (with Triton), then the op with CUTEBWD_SCHEDULE (default wide) against cuDNN's SM90 backward, same run
  if [ -z "${SKIP_D512:-}" ]; then
    capped 100 bwd_ablation_d512.log python -m csrc_dsl.cute.sm90.sparse_attention_bwd --H 64 --D 512 --no-triton \
      --ablation kernel split wide_uniform
  fi
  capped 120 bwd_ablation_h16.log python -m csrc_dsl.cute.sm90.sparse_attention_bwd --H 16 32 --ablation none kernel split
  # the dispatch's two Triton rows for the backward (`cute_backward_faster`, measured in November with the split
  # schedule): H <= 16, and deterministic mode above 64 heads; the two whole ops, same run
  if [ -z "${SKIP_DET:-}" ]; then
    capped 120 bwd_det_h16_h128.log python -m csrc_dsl.cute.sm90.sparse_attention_bwd --H 16 128 --deterministic
  fi
  DSA_OPS_CUTE_SPARSE_BWD_SCHEDULE=${CUTEBWD_SCHEDULE:-wide} capped 230 bench_bwd.log python -m benchmarks.run \
    --headline --ops sparse_attention_backward --no-overhead --out "$OUT/bwd"
  ;;
bwdcheck)  # staged: after a change to the CuTe-DSL backward: its tests, ablations, then vs cuDNN and Triton
  capped 220 cute_bwd_pytest.log python -m pytest -q -p no:cacheprovider -rfE tests/test_cute_sm90_bwd.py "$@"
  capped 150 bwd_ablation.log python -m csrc_dsl.cute.sm90.sparse_attention_bwd --H 16 64 128 --no-triton \
    --ablation none kernel serial_dkv tiled_dkv no_dkv_write no_dkv
  capped 200 bench_bwd.log python -m benchmarks.run --headline --ops sparse_attention_backward \
    --also-backends triton --no-overhead --out "$OUT/bwd"
  if [ -n "${DKV_MICRO:-}" ]; then capped 60 bench_dkv_reduction.log python -m benchmarks.bench_dkv_reduction; fi
  ;;
layouts)   # staged: top-k GPU tests + top-k vs cuDNN, then the indexer-logits layout experiment vs cuDNN
  capped 240 topk_gpu_pytest.log python -m pytest -q -p no:cacheprovider -rfE tests/test_triton_topk.py -k gpu
  capped 90 topk_bench.log python -m benchmarks.bench_topk
  capped 60 layouts_pytest.log python -m pytest -q -p no:cacheprovider -rfE tests/test_indexer_layouts.py
  capped 240 indexer_layouts.log python -m benchmarks.experiments.indexer_layouts
  ;;
detcheck)  # staged: the CuTe backward's tests, its deterministic mode and Triton's vs the fast mode, headline
  capped 280 cute_bwd_pytest.log python -m pytest -q -p no:cacheprovider -rfE tests/test_cute_sm90_bwd.py "$@"
  capped 120 bwd_det.log python -m csrc_dsl.cute.sm90.sparse_attention_bwd --H 16 64 128 --deterministic
  capped 90 bwd_fast.log python -m csrc_dsl.cute.sm90.sparse_attention_bwd --H 16 64 128 --no-triton
  capped 200 bench_bwd.log python -m benchmarks.run --headline --ops sparse_attention_backward \
    --also-backends triton --no-overhead --out "$OUT/bwd"
  ;;
headline)  # staged: every issue-target shape (top-k, indexer, forward, backward) against cuDNN, Triton as well;
           # first the row-stream experiment (the top-k's access pattern alone)
  capped 100 row_stream.log python -m benchmarks.experiments.row_stream
  capped 90 topk_bench.log python -m benchmarks.bench_topk
  capped 330 bench_headline.log python -m benchmarks.run --headline --also-backends triton --no-overhead \
    --out "$OUT/headline" "$@"
  ;;
scoreops)  # staged: the CuTe score kernel in the dispatch (sparse and dense): its tests, both ops vs cuDNN and
           # Triton at every suite shape (S = 4K/8K), then opcheck/compile/graph tests through the dispatch
  capped 170 cute_score_pytest.log python -m pytest -q -p no:cacheprovider -rfE tests/test_cute_sm90_score.py \
    tests/test_dispatch.py
  capped 100 score_heads.log python -m benchmarks.experiments.score_heads
  capped 280 bench_score.log python -m benchmarks.run --quick --ops sparse_attn_score,dense_attn_score \
    --also-backends triton --no-overhead --out "$OUT/score"
  capped 150 compile_pytest.log python -m pytest -q -p no:cacheprovider -rfE compile_tests/test_opcheck.py \
    compile_tests/test_compile.py -k "cuda or graph or dense" "$@"
  ;;
score)     # staged: CuTe score GPU tests, score-op launch settings vs cuDNN (SWEEP=1), Triton forward/score GPU tests + graphs
  capped 150 cute_score_pytest.log python -m pytest -q -p no:cacheprovider -rfE tests/test_cute_sm90_score.py
  if [ -n "${SWEEP:-}" ]; then capped 240 score_launch.log python -m benchmarks.experiments.score_launch; fi
  capped 190 fwd_gpu_pytest.log python -m pytest -q -p no:cacheprovider -rfE tests/test_triton_sparse_attention_fwd.py \
    compile_tests/test_compile.py
  ;;
verify)
  capped 120 decode_server.log python -m examples.decode_server --compile
  capped 150 train_step.log python -m examples.train_step --out "$OUT"
  capped 260 pytest_subset.log python -m pytest -q -p no:cacheprovider -rfE "$@"
  ;;
*) echo "unknown phase $phase"; exit 2 ;;
esac
