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
#   source .device/s3/stage.sh && bash tools/device_session.sh bwdcheck               # CuTe bwd tests + vs cuDNN
#   source .device/s3/stage.sh && bash tools/device_session.sh bwdncu                 # CuTe bwd ncu at H = 64
#   source .device/s3/stage.sh && bash tools/device_session.sh layouts   # top-k tests, indexer MMA layouts vs cuDNN
#   source .device/s3/stage.sh && bash tools/device_session.sh score     # score-op launch settings vs cuDNN + tests
#   source .device/s3/stage.sh && bash tools/device_session.sh detcheck  # CuTe bwd tests, deterministic modes
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
phase=${1:?phase: s22b | s22a | s21c | s21b | s21a | s20b | s20a | s19q | s19h | s19v | s19b | s19c | s18 | s17fwd | bwdpair | persist6 | persist3 | persist | persist2 | qhint | flashmla | seesaw5 | seesaw4 | seesaw2 | seesaw | topk5 | topk4 | topk3 | rprof | opening | topk2 | headline | scoreops | detcheck | score | layouts | cute | bench | recheck | profile | topk | full | suite | bwdprof | bwdncu | bwdcheck | verify}; shift || true

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

case "$phase" in
seesaw)   # session 13: the CuTe-DSL forward's seesaw schedule: a first check (stops here on failure or a hang),
          # its tests as the selected schedule, then every schedule and Triton timed side by side
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
  capped 120 fwd_seesaw_first.log python -m pytest -x -q -p no:cacheprovider -rfE tests/test_cute_sm90.py \
    -k "each_schedule and seesaw" || exit 1
  capped 240 fwd_seesaw_pytest.log env DSA_OPS_CUTE_SPARSE_FWD_SCHEDULE=seesaw \
    python -m pytest -q -p no:cacheprovider -rfE tests/test_cute_sm90.py
  capped 200 fwd_schedules.log python -m benchmarks.bench_cute_fwd_schedules "$@"
  ;;
persist)  # session 15: the persistent seesaw grid (variant seesaw+persistent): checked (stops on failure), then
          # every seesaw variant timed against FlashMLA on all cases, one run (carry .device/flashmla)
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
  capped 220 cute_fwd_pytest.log python -m pytest -q -p no:cacheprovider -rfE tests/test_cute_sm90.py \
    -k "each_schedule or persistent or deterministic" || exit 1
  capped 340 fwd_vs_flashmla_random.log python -m benchmarks.bench_cute_fwd_schedules --ids random --variants \
    --no-triton --schedules seesaw --cases all --reps 30 --flashmla .device/flashmla/libflashmla_sm90_sparse_fwd.so
  ;;
persist2)  # session 15: time = fixed + K x per_key for every variant and FlashMLA; the headline cases on sorted ids
  lib=.device/flashmla/libflashmla_sm90_sparse_fwd.so
  capped 220 fwd_k_sweep.log python -m benchmarks.bench_cute_fwd_schedules --cases k_sweep --variants --no-triton \
    --schedules seesaw --reps 20 --flashmla $lib
  capped 200 fwd_vs_flashmla_sorted.log python -m benchmarks.bench_cute_fwd_schedules --ids sorted --variants \
    --no-triton --schedules seesaw --cases headline --reps 30 --flashmla $lib
  ;;
persist3)  # session 15: the persistent grid with items claimed from a counter (seesaw+persistent_dynamic), checked,
           # then the K sweep (fixed cost and per-key cost of each) and all cases against FlashMLA, one run
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
  capped 200 cute_fwd_pytest.log python -m pytest -q -p no:cacheprovider -rfE tests/test_cute_sm90.py \
    -k "each_schedule or persistent" || exit 1
  lib=.device/flashmla/libflashmla_sm90_sparse_fwd.so
  capped 150 fwd_k_sweep.log python -m benchmarks.bench_cute_fwd_schedules --cases k_sweep --variants --no-triton \
    --schedules seesaw --reps 20 --flashmla $lib
  capped 200 fwd_vs_flashmla_random.log python -m benchmarks.bench_cute_fwd_schedules --ids random --variants \
    --no-triton --schedules seesaw --cases all --reps 30 --flashmla $lib
  ;;
s22b)  # session 22, at most 480 s, no staging: after DQ_IN_DKV and the forward's ids ahead left the kernels (their
       # signatures changed), the Triton forward's and backward's GPU tests; the backward's defaults timed in both
       # modes; then an ncu profile of the dkv kernel at H = 64 (how close its fp32 reductions run to L2's rate)
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
s22a)  # session 22, at most 420 s, no staging: the dq kernel on a second stream (DQ_STREAM: its gather, bound by
       # L2 reads, may run beside the dkv kernel, bound by its fp32 reductions; 1: launched before the dkv kernel,
       # 2: after it), against the default in the same run; then the backward's GPU tests (the CUDA-graph test
       # among them: capture forks onto the second stream) with DQ_STREAM=1 forced. Ran in session 22; not kept:
       # the knob is in docs/experiments/triton-bwd-dq-stream.patch (apply it to re-run this phase)
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
  capped 150 triton_bwd_dq_stream.log python -m benchmarks.bench_sparse_attention_bwd --heads 64,128 --no-baseline \
    --profile --modes fast --configs "default;default,DQ_STREAM=1;default,DQ_STREAM=2"
  capped 120 triton_bwd_tests_dq_stream.log env DSA_SPARSE_ATTN_BWD_CONFIG="default,DQ_STREAM=1" \
    python -m pytest -q -p no:cacheprovider -rfE tests/test_triton_sparse_attention_bwd.py
  ;;
s21c)  # session 21, run in session 22 (DQ_IN_DKV and the forward's ids ahead are now docs/experiments patches), at most 500 s, no staging: the Triton forward with each
       # tile's ids loaded a step ahead at its
       # default 64-key tiles (2 stages: the gather can then be issued a whole tile ahead, Triton 3.6: 144 B of spill
       # instead of 88, same shared memory; 1 stage: as in the backward's score kernel), against the default in the
       # same run, every setting checked first; then the forward's GPU tests with the 2-stage one forced, and the
       # Triton backward's CUDA-graph test
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
  capped 90 triton_fwd_ahead.log python -m benchmarks.bench_sparse_attention --cases "fwd V3.2" --sweep --configs \
    h64_n64_w8_s2,h64_n64_w8_s2_ahead,h64_n64_w8_s1_ahead
  capped 70 triton_fwd_tests.log env DSA_TRITON_SPARSE_FWD_CONFIG=h64_n64_w8_s2_ahead \
    python -m pytest -q -p no:cacheprovider -rfE tests/test_triton_sparse_attention_fwd.py -k "gpu or public or real_dims or split_k or decode_small"
  # written in session 21 after its last lease: the Triton backward's defaults captured in a CUDA graph; dq formed
  # inside the dkv kernel (DQ_IN_DKV=1, no dq kernel: the dkv kernel is bound by its fp32 reductions, not by L2
  # reads, so the gather of dq may overlap them; Triton 3.6: 163 registers and 131072 B at H = 128, one CTA per SM
  # instead of two; on 64-column blocks 120 registers, 81920 B, two), timed against the default, then its tests
  capped 60 triton_bwd_graph.log python -m pytest -q -p no:cacheprovider -rfE tests/test_triton_sparse_attention_bwd.py -k graph
  capped 150 triton_bwd_dq_in_dkv.log python -m benchmarks.bench_sparse_attention_bwd --heads 64,128 --no-baseline \
    --profile --modes fast --configs "default;default,DQ_IN_DKV=1;default,DQ_IN_DKV=1,DKV_BLOCK_D=64"
  capped 90 triton_bwd_tests_dq_in_dkv.log env DSA_SPARSE_ATTN_BWD_CONFIG="default,DQ_IN_DKV=1" \
    python -m pytest -q -p no:cacheprovider -rfE tests/test_triton_sparse_attention_bwd.py
  ;;
s21b)  # session 21, at most 300 s, no staging: the stacked score kernel with each tile's ids loaded a step ahead
       # (STACKED_IDS_AHEAD=1: at one stage nothing else hides the ids' L2 round trip before the gather; Triton 3.6:
       # 220 registers instead of 190, no spill), and the dkv kernel on 16-slot tiles (4 CTAs per SM at H = 64
       # instead of 3, 2 at H = 128), against the default in the same run; then the GPU tests with the ids ahead
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
  capped 150 triton_bwd_fast.log python -m benchmarks.bench_sparse_attention_bwd --heads 64,128 --no-baseline \
    --profile --modes fast --configs "default;default,STACKED_IDS_AHEAD=1;default,DKV_BLOCK_N=16;default,DKV_BLOCK_N=16,DKV_STAGES=4"
  capped 80 triton_bwd_tests_ids_ahead.log env DSA_SPARSE_ATTN_BWD_CONFIG="default,STACKED_IDS_AHEAD=1" \
    python -m pytest -q -p no:cacheprovider -rfE tests/test_triton_sparse_attention_bwd.py
  ;;
s21a)  # session 21, at most 520 s, no staging: the stacked score product on 64-slot tiles at one stage, the default
       # since this session (Triton <= 3.6), against the two products (SCORE_STACKED=0, the default before) in the
       # same run, fast and deterministic; the dq kernel's column split (DQ_SPLIT=1: 128 heads and half of the
       # columns per program, so each kv row is gathered once per query instead of once per 64-head block), on 8
       # and 16 warps; then the GPU tests of the Triton backward (as is and with the column split forced),
       # autograd and torch.compile / CUDA graphs (without staging, SM90 dispatches the sparse-attention
       # backward to Triton)
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
  python -c "import triton; print('triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
  capped 150 triton_bwd_fast.log python -m benchmarks.bench_sparse_attention_bwd --heads 64,128 --no-baseline \
    --profile --modes fast --configs "default;default,SCORE_STACKED=0;default,DQ_SPLIT=1;default,DQ_SPLIT=1,DQ_WARPS=16"
  capped 120 triton_bwd_det.log python -m benchmarks.bench_sparse_attention_bwd --heads 64,128 --no-baseline \
    --modes deterministic --configs "default;default,SCORE_STACKED=0"
  capped 80 triton_bwd_tests.log python -m pytest -q -p no:cacheprovider -rfE tests/test_triton_sparse_attention_bwd.py
  capped 80 triton_bwd_tests_dq_split.log env DSA_SPARSE_ATTN_BWD_CONFIG="default,DQ_SPLIT=1" \
    python -m pytest -q -p no:cacheprovider -rfE tests/test_triton_sparse_attention_bwd.py
  capped 60 autograd_tests.log python -m pytest -q -p no:cacheprovider -rfE tests/test_autograd.py
  capped 120 compile_tests.log python -m pytest -q -p no:cacheprovider -rfE compile_tests/test_compile.py
  ;;
s20b)  # session 20's next phase, run in session 21 (prepared in session 20, not yet run), at most 480 s, no staging needed, fast mode, per kernel,
       # against the default in the same run:
       # - the score kernel's stacked product (SCORE_STACKED=1): S and dP as one [128 x 32] product over q and dO
       #   stacked in M, on 8 warps, so that each warpgroup runs one of the two wgmma chains (36 wgmmas each instead
       #   of one warpgroup running all 68) and its exp / stores, with one exchange of the halves per tile (Triton 3.6:
       #   186 registers, no spill, 229376 B of shared memory: fits the H100's 232448); also on 64-slot tiles;
       # - the score kernel on 64-slot tiles (one stage: two do not fit next to Q and dO), m64n64 wgmmas: a third
       #   fewer shared-memory bytes per slot (Triton 3.6: 255 registers, a 48-byte spill, all of it before the tile
       #   loop in the SASS; 213 KB of shared memory);
       # - the dkv kernel on 256-column blocks (value part: 2 programs per token instead of 4, so the dS / P
       #   workspace is read 3 + 2 times per token instead of 5 + 4; one CTA per SM at H = 128)
       # then the test file with the stacked product forced, then an ncu profile of the default score kernel (its
       # 4600 cycles per 32-slot tile at H = 128 are about 3x what its shared-memory reads need)
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
  capped 180 triton_bwd_tiles.log python -m benchmarks.bench_sparse_attention_bwd --heads 64,128 --no-baseline \
    --profile --modes fast --configs "default;default,SCORE_STACKED=1;default,SCORE_STACKED=1,SCORE_BLOCK_N=64,SCORE_STAGES=1;default,SCORE_BLOCK_N=64,SCORE_STAGES=1;default,DKV_BLOCK_D=256"
  capped 70 triton_bwd_tests.log env DSA_SPARSE_ATTN_BWD_CONFIG="default,SCORE_STACKED=1" \
    python -m pytest -q -p no:cacheprovider -rfE tests/test_triton_sparse_attention_bwd.py
  capped 200 ncu_scores.log ncu --clock-control none -k regex:_scores_kernel --launch-skip 1 --launch-count 1 \
    --set full -f -o "$OUT/scores_h128" python -m benchmarks.bench_sparse_attention_bwd --heads 128 --no-baseline \
    --modes fast --configs default
  ncu_report scores_h128 25
  ;;
s20a)  # session 20, at most 400 s, no staging needed, with docs/experiments/triton-ids-ahead.patch applied (not
       # kept: slower): the Triton forward and backward with each tile's kv row ids
       # loaded one step ahead (Triton's pipeliner then issues the gather num_stages - 1 tiles ahead, where the ids
       # loaded in the step made it an indirect load issued only after the previous tile's products), deeper
       # pipelines that this allows, against the defaults in the same run; every setting checked before it is timed;
       # then both files' GPU tests with the likeliest new settings forced through the environment
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
  capped 120 triton_fwd_ahead.log python -m benchmarks.bench_sparse_attention --cases "fwd V3.2" --sweep --configs \
    h64_n64_w8_s2,h64_n32_w8_s3_ahead,h64_n16_w8_s4_ahead
  capped 150 triton_bwd_ahead.log python -m benchmarks.bench_sparse_attention_bwd --heads 64,128 --no-baseline \
    --profile --modes fast --configs "default;default,IDS_AHEAD=1,SCORE_BLOCK_N=16,SCORE_STAGES=3;default,IDS_AHEAD=1,SCORE_BLOCK_N=16,SCORE_STAGES=3,DQ_BLOCK_N=32,DQ_STAGES=3"
  capped 70 triton_bwd_tests.log env DSA_SPARSE_ATTN_BWD_CONFIG="default,IDS_AHEAD=1,SCORE_BLOCK_N=16,SCORE_STAGES=3,DQ_BLOCK_N=32,DQ_STAGES=3" \
    python -m pytest -q -p no:cacheprovider -rfE tests/test_triton_sparse_attention_bwd.py
  capped 60 triton_fwd_tests.log env DSA_TRITON_SPARSE_FWD_CONFIG="BLOCK_H=64,BLOCK_N=32,num_warps=8,num_stages=3,ids_ahead=1" \
    python -m pytest -q -p no:cacheprovider -rfE tests/test_triton_sparse_attention_fwd.py -k "gpu or public or real_dims or split_k or decode_small"
  ;;
s19q)  # session 19, at most 150 s, no staging needed: the Triton dq kernel with 16 warps (126 registers under Triton 3.6,
       # where the default's 8 warps take 255 with a small spill) and 32-slot tiles, fast mode, per kernel
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
  capped 140 triton_bwd_dq.log python -m benchmarks.bench_sparse_attention_bwd --heads 64,128 --no-baseline \
    --profile --modes fast --configs "default;default,DQ_WARPS=16;default,DQ_WARPS=16,DQ_BLOCK_N=32;default,DQ_BLOCK_N=32"
  ;;
s19h)  # session 19, at most 150 s, no staging needed: the Triton backward's new dkv tiles at the head counts the SM90
       # dispatch sends to Triton (H <= 16) and at H = 32, against the old tiles in the same run, both modes
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
  capped 140 triton_bwd_small_h.log python -m benchmarks.bench_sparse_attention_bwd --heads 16,32 --no-baseline \
    --profile --modes fast,deterministic --configs "default;default,DKV_BLOCK_N=64"
  ;;
s19v)  # session 19's closing check, at most 500 s, after the three staging calls: the op-level GPU tests (dispatch,
       # autograd, warmup, torch.compile and CUDA graphs) and the Triton backward's file with the session's defaults,
       # then the demo
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
  capped 450 gpu_tests.log python -m pytest -q -p no:cacheprovider -rfE tests/test_dispatch.py tests/test_autograd.py \
    tests/test_warmup.py tests/test_triton_sparse_attention_bwd.py tests/test_against_cudnn.py compile_tests
  capped 40 demo.log python -m dsa_ops
  ;;
s19c)  # session 19, at most 280 s, after the three staging calls: the CuTe-DSL forward's cluster pair (two CTAs of a
       # token sharing their gathered rows), its oracle tests first (a hang or failure stops here), then every
       # benchmark case timed against the op's default variant in one run. Slower, so the variant is now
       # docs/experiments/cute-fwd-cluster-pair.patch: apply it (on 3669640) before running this phase
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
  capped 120 cluster_pytest.log python -m pytest -x -q -p no:cacheprovider -rfE tests/test_cute_sm90.py \
    -k "cluster and not compile" || exit 1
  capped 150 fwd_cluster_vs_default.log python -m benchmarks.bench_cute_fwd_schedules --ids random --no-triton \
    --variants "seesaw+persistent_dynamic+hoisted_addresses,seesaw+persistent_dynamic+hoisted_addresses+cluster_pair" \
    --schedules seesaw --cases headline --reps 20
  ;;
s19b)  # session 19, at most 300 s, no staging needed: the Triton dkv kernel's tile settings around the new default
       # (32-slot tiles) that Triton 3.6 compiles to more CTAs per SM, the old 64-slot default in the same run, fast
       # and deterministic, per kernel; then the whole Triton backward test file with the default
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
  capped 160 triton_bwd_sweep.log python -m benchmarks.bench_sparse_attention_bwd --heads 64,128 --no-baseline \
    --profile --modes fast --configs "default;default,DKV_BLOCK_N=64;default,DKV_BLOCK_N=16;default,DKV_STAGES=1;default,DKV_BLOCK_D=64,DKV_WARPS=4;default,DKV_BLOCK_N=16,DKV_STAGES=3"
  capped 60 triton_bwd_det.log python -m benchmarks.bench_sparse_attention_bwd --heads 64,128 --no-baseline \
    --modes deterministic --configs "default;default,DKV_BLOCK_N=64"
  capped 80 triton_bwd_tests.log python -m pytest -q -p no:cacheprovider -rfE tests/test_triton_sparse_attention_bwd.py
  ;;
s17fwd|s18)  # session 17's next step. s17fwd, at most 250 s: the forward's GPU tests through the op (oracle, CUDA
             # graph, determinism), the torch.compile and CUDA-graph tests of compile_tests, and the demo, with
             # S17_FWD_VARIANT (default seesaw+persistent_dynamic+hoisted_addresses, the fastest variant in session 17)
             # as the op's forward: if they pass, it becomes DEFAULT_VARIANT. s18, about 400 s: the same, then the
             # backward's "pair" dkv write again (its shuffles now ahead of the writes): its tests and the kernel
             # alone against "vector", alternated twice in one run
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
  export DSA_OPS_CUTE_SPARSE_FWD_SCHEDULE=${S17_FWD_VARIANT:-seesaw+persistent_dynamic+hoisted_addresses}
  capped 100 fwd_op_tests.log python -m pytest -q -p no:cacheprovider -rfE tests/test_cute_sm90.py \
    -k "fwd and not spills and not each_schedule and not persistent"
  capped 120 compile_graph_tests.log python -m pytest -q -p no:cacheprovider -rfE compile_tests/test_compile.py \
    compile_tests/test_examples.py -k "graph"
  capped 30 demo.log python -m dsa_ops
  unset DSA_OPS_CUTE_SPARSE_FWD_SCHEDULE
  [ "$phase" = s18 ] || exit 0
  capped 100 bwd_pair_pytest.log python -m pytest -x -q -p no:cacheprovider -rfE tests/test_cute_sm90_bwd.py \
    -k "(pair or paths_agree) and not compile"
  capped 100 bwd_pair_kernel.log python -m csrc_dsl.cute.sm90.sparse_attention_bwd --H 64 128 --no-triton \
    --ablation kernel pair_dkv kernel pair_dkv
  ;;
bwdpair)  # session 17, about 330 s: the backward's dkv write "pair" (one lane-exchange stage, permuted accumulator
         # columns): its GPU tests (stops on failure), the kernel alone against "vector" (the default) alternated
         # twice in one run, the op with it against cuDNN (benchmarks.run --headline, same run), then the L2 rate
         # of fp32 reductions by the threads and by the TMA unit (bench_dkv_reduction --bulk)
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
  capped 150 bwd_pair_pytest.log python -m pytest -x -q -p no:cacheprovider -rfE tests/test_cute_sm90_bwd.py \
    -k "(pair or paths_agree) and not compile" || exit 1
  capped 120 bwd_pair_kernel.log python -m csrc_dsl.cute.sm90.sparse_attention_bwd --H 64 128 --no-triton \
    --ablation kernel pair_dkv kernel pair_dkv
  capped 150 bwd_pair_vs_cudnn.log env DSA_OPS_CUTE_SPARSE_BWD_DKV_WRITE=pair python -m benchmarks.run --headline \
    --ops sparse_attention_backward --no-overhead --out "$OUT/bwd"
  # the L2 reduction rate by piece width, threads' red.v4 against the TMA unit's bulk reductions, same run
  capped 90 dkv_reduction.log python -m benchmarks.bench_dkv_reduction --bulk
  ;;
persist6)  # sessions 15-16, one call of at most ~420 s: the forward variants timed against FlashMLA (each checked
           # against the fp64 oracle first), their tests (stops on failure), then the forward's op-level tests and
           # the demo with PERSIST6_OP_VARIANT as the op's forward. Replaces session 15's persist5 (never run), which
           # also timed direct_store and wide_producer alone: `bench_cute_fwd_schedules --variants a,b` does that
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
  v=seesaw+hoisted_addresses,seesaw+direct_store+hoisted_addresses,seesaw+persistent_dynamic
  capped 100 fwd_vs_flashmla_random.log python -m benchmarks.bench_cute_fwd_schedules --ids random \
    --variants "$v,seesaw+persistent_dynamic+hoisted_addresses" --no-triton --schedules seesaw --cases all --reps 20 \
    --flashmla .device/flashmla/libflashmla_sm90_sparse_fwd.so
  capped 110 cute_fwd_pytest.log python -m pytest -x -q -p no:cacheprovider -rfE tests/test_cute_sm90.py \
    -k "(hoisted or persistent) and not compile" || exit 1
  [ -n "${PERSIST6_SKIP_OP:-}" ] && exit 0   # a shorter call: the timings and the kernels' oracle tests only
  export DSA_OPS_CUTE_SPARSE_FWD_SCHEDULE=${PERSIST6_OP_VARIANT:-seesaw+persistent_dynamic+hoisted_addresses}
  capped 140 gpu_tests.log python -m pytest -q -p no:cacheprovider -rfE tests/test_cute_sm90.py tests/test_dispatch.py \
    compile_tests -k "not each_schedule and not persistent and not compiles and not bwd and not backward"
  capped 30 demo.log python -m dsa_ops
  ;;
qhint)  # session 14: Q loaded with an L2 evict_first policy (variant seesaw+q_evict_first): checked, then timed
        # against plain seesaw and FlashMLA in one run, and both kernels profiled at S_kv = 65536 (carry .device/flashmla)
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
  capped 200 cute_fwd_pytest.log python -m pytest -q -p no:cacheprovider -rfE tests/test_cute_sm90.py \
    -k "each_schedule" || exit 1
  lib=.device/flashmla/libflashmla_sm90_sparse_fwd.so
  capped 200 fwd_vs_flashmla_random.log python -m benchmarks.bench_cute_fwd_schedules --ids random --variants \
    --no-triton --schedules seesaw --cases headline --reps 50 --flashmla $lib
  # where the time goes outside the tile loop: K = 128 ... 2048, time = fixed + K * per_key, ours and FlashMLA
  capped 200 fwd_k_sweep.log python -m benchmarks.bench_cute_fwd_schedules --cases k_sweep --variants --no-triton \
    --schedules seesaw --reps 30 --flashmla $lib
  # third headline case (H=128, S_kv=65536): skip 2 x (2 checks + 2 x 2 rounds) + its 2 checks, profile seesaw, FlashMLA
  capped 200 ncu_64k.log ncu --clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis \
    -k regex:"sparse_attn_fwd_kernel|SparseAttentionFwdSm90" --launch-skip 14 --launch-count 2 -f -o "$OUT/fwd_64k" \
    python -m benchmarks.bench_cute_fwd_schedules --cases headline --reps 2 --no-triton --schedules seesaw --flashmla $lib
  ncu -i "$OUT/fwd_64k.ncu-rep" --page details > "$OUT/ncu_64k_details.txt" 2>&1
  ncu -i "$OUT/fwd_64k.ncu-rep" --page raw --csv 2>/dev/null | gzip > "$OUT/ncu_64k_raw.csv.gz"; rm -f "$OUT/fwd_64k.ncu-rep"
  grep -E "Duration|L2 Hit|DRAM Throughput|L2 Cache Throughput" "$OUT/ncu_64k_details.txt"
  ;;
flashmla)  # session 14: our forward and FlashMLA's SM90 sparse prefill side by side, interleaved on the same inputs
           # (carry .device/flashmla, built on the CPU by benchmarks/flashmla_baseline/build.sh)
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
  for ids in random sorted; do
    capped 240 "fwd_vs_flashmla_$ids.log" python -m benchmarks.bench_cute_fwd_schedules --ids "$ids" --variants \
      --no-triton --schedules seesaw --cases "${FLASHMLA_CASES:-all}" --reps "${FLASHMLA_REPS:-50}" \
      --flashmla .device/flashmla/libflashmla_sm90_sparse_fwd.so
  done
  ;;
seesaw4)  # session 14 (run at 8e885e0 with the rotated order as a third variant): seesaw with and without its
          # L2-hinted gather, checked, then timed on ids in sorted and random order; the gather alone; the harness
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
  capped 200 cute_fwd_pytest.log python -m pytest -q -p no:cacheprovider -rfE tests/test_cute_sm90.py \
    ${SEESAW4_TESTS:--k "each_schedule or deterministic"}
  for ids in sorted random; do
    capped 200 "fwd_opts_$ids.log" python -m benchmarks.bench_cute_fwd_schedules --ids "$ids" --variants \
      --no-triton --schedules seesaw --cases all --reps "${SEESAW4_REPS:-30}"
  done
  # the gather alone (consumers only hand the stages back): the floor for one 64-head CTA per token
  for H in 16 64; do
    capped 60 "fwd_gather_only_h$H.log" python -m csrc_dsl.cute.sm90.sparse_attention_fwd --schedule split_keys \
      --ablation no_math --H "$H"
  done
  # the op through the headline harness (ids from torch.topk(sorted=False)), per variant of the forward
  for variant in seesaw seesaw-no_l2_hints; do
    DSA_OPS_CUTE_SPARSE_FWD_SCHEDULE=$variant capped 90 "headline_$variant.log" python -m benchmarks.run \
      --headline --ops sparse_attention --no-overhead --out "$OUT/headline_$variant"
  done
  ;;
seesaw5)  # session 14: the op-level GPU tests (with SEESAW5_VARIANT as the op's forward, if given) and the demo
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
  DSA_OPS_CUTE_SPARSE_FWD_SCHEDULE=${SEESAW5_VARIANT:-} capped 420 gpu_tests.log \
    python -m pytest -q -p no:cacheprovider -rfE tests/test_cute_sm90.py tests/test_dispatch.py \
    tests/test_autograd.py tests/test_warmup.py compile_tests
  DSA_OPS_CUTE_SPARSE_FWD_SCHEDULE=${SEESAW5_VARIANT:-} capped 120 demo.log python -m dsa_ops
  ;;
seesaw2)  # session 13: seesaw as the default: op-level GPU tests, the headline harness, the demo, an ablation
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader | tee "$OUT/gpu.txt"
  capped 420 gpu_tests.log python -m pytest -q -p no:cacheprovider -rfE tests/test_cute_sm90.py \
    tests/test_dispatch.py tests/test_autograd.py tests/test_warmup.py compile_tests
  capped 150 headline_fwd.log python -m benchmarks.run --headline --ops sparse_attention --also-backends triton \
    --no-overhead --out "$OUT/headline"
  for ab in none no_gather; do
    capped 60 "fwd_ablation_$ab.log" python -m csrc_dsl.cute.sm90.sparse_attention_fwd --schedule seesaw --ablation "$ab"
  done
  capped 120 demo.log python -m dsa_ops
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
opening)   # staged: the cuDNN cross-test and the score dispatch tests (never run on a GPU yet), the top-k GPU tests
           # (the register-resident kernel is new), the top-k sweep's defaults, H200 and resident rows
  capped 150 against_cudnn_pytest.log python -m pytest -q -p no:cacheprovider -rfE tests/test_against_cudnn.py \
    tests/test_cute_sm90_score.py -k "cudnn or dispatch or dense"
  capped 300 topk_pytest.log python -m pytest -q -p no:cacheprovider -rfE tests/test_triton_topk.py -k "gpu or resident"
  capped 230 topk_sweep.log python -m benchmarks.bench_topk --sweep --pick 0,8,12,13,14,15,16
  ;;
rprof)     # no staging needed: ncu (full set + SASS samples) of the resident kernel at 4096 x 8192 and the streaming
           # kernel at 4096 x 65536 (k=2048), where each spends its time; then the resident settings
  for spec in "_resident_topk_kernel 8192" "_stream_topk_kernel 65536"; do
    set -- $spec
    capped 150 ncu_$2.log ncu -k regex:$1 --launch-skip 3 --launch-count 1 --set full --import-source yes \
      -f -o "$OUT/topk_$2" python -m tools.profile_topk 4096 $2 2048
    ncu_report topk_$2 30
  done
  capped 100 topk_sweep.log python -m benchmarks.bench_topk --sweep --pick 0,13,14,19
  ;;
topk5)     # staged: more streaming top-k settings (sample 2048, wider buffer passes, 20 programs/SM), then vs cuDNN
  capped 200 topk_sweep.log python -m benchmarks.bench_topk --sweep --pick 0,21,22,23,24,0
  capped 60 topk_bench.log python -m benchmarks.bench_topk
  ;;
topk4)     # staged: topk3 again after the resident kernel's inline-PTX count was limited to >= 4 values a thread
  capped 300 topk_pytest.log python -m pytest -q -p no:cacheprovider -rfE --durations=8 tests/test_triton_topk.py \
    -k "gpu or resident"
  capped 120 indexer_pytest.log python -m pytest -q -p no:cacheprovider -rfE tests/test_triton_indexer.py -k "gpu or topk"
  capped 60 topk_bench.log python -m benchmarks.bench_topk
  capped 150 bench_indexer.log python -m benchmarks.run --headline --ops indexer_logits,topk,indexer_topk --no-overhead \
    --out "$OUT/indexer"
  ;;
topk3)     # staged: the streaming top-k with prefetching buffer passes, the register-sample guess and the compaction
           # straight into the output; then the fused indexer top-k without its prefill; GPU tests first
  capped 300 topk_pytest.log python -m pytest -q -p no:cacheprovider -rfE tests/test_triton_topk.py -k "gpu or resident"
  capped 120 indexer_pytest.log python -m pytest -q -p no:cacheprovider -rfE tests/test_triton_indexer.py -k "gpu or topk"
  capped 120 topk_sweep.log python -m benchmarks.bench_topk --sweep --pick 0,12,20,13,19
  capped 60 topk_bench.log python -m benchmarks.bench_topk
  capped 150 bench_indexer.log python -m benchmarks.run --headline --ops indexer_logits,topk,indexer_topk --no-overhead \
    --out "$OUT/indexer"
  ;;
topk2)     # staged: top-k GPU tests, the resident kernel's settings, top-k vs cuDNN, the indexer ops vs cuDNN
  capped 230 topk_pytest.log python -m pytest -q -p no:cacheprovider -rfE tests/test_triton_topk.py -k "gpu or resident"
  capped 110 topk_sweep.log python -m benchmarks.bench_topk --sweep --pick 0,17,18,19
  capped 60 topk_bench.log python -m benchmarks.bench_topk
  capped 150 bench_indexer.log python -m benchmarks.run --headline --ops indexer_logits,topk,indexer_topk --no-overhead \
    --out "$OUT/indexer"
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
