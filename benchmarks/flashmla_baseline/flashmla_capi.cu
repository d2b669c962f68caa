// A C entry point to FlashMLA's SM90 sparse prefill forward, so that benchmarks/bench_cute_fwd_schedules.py can run it
// through ctypes on the same inputs as ours (issue 4 measures our forward against it). A baseline only: it is
// built from a FlashMLA checkout by build.sh and nothing of it ships in dsa_ops.
#include <cuda_runtime.h>
#include <exception>
#include <cstdio>

#include "params.h"
#include "sm90/prefill/sparse/fwd.h"

// q [s_q, h_q, d_qk] bf16, kv [s_kv, d_qk] bf16 (one kv head), indices [s_q, topk] int32, all contiguous;
// attn_sink [h_q] fp32 and topk_length [s_q] int32 may be null. Outputs: out [s_q, h_q, d_v] bf16, max_logits and
// lse [s_q, h_q] fp32. Returns 0, or a CUDA error code, or -1 when the launcher threw.
extern "C" int flashmla_sm90_sparse_fwd(int s_q, int s_kv, int h_q, int d_qk, int d_v, int topk, float sm_scale,
                                        void* q, void* kv, void* indices, void* attn_sink, void* topk_length,
                                        void* out, void* max_logits, void* lse, int num_sm, void* stream) {
    SparseAttnFwdParams p{};
    p.s_q = s_q; p.s_kv = s_kv; p.h_q = h_q; p.h_kv = 1; p.d_qk = d_qk; p.d_v = d_v; p.topk = topk;
    p.sm_scale = sm_scale;
    p.sm_scale_div_log2 = sm_scale * 1.4426950408889634f;   // FlashMLA's name for scale * log2(e)
    p.q = static_cast<cutlass::bfloat16_t*>(q);
    p.kv = static_cast<cutlass::bfloat16_t*>(kv);
    p.indices = static_cast<int*>(indices);
    p.attn_sink = static_cast<float*>(attn_sink);
    p.topk_length = static_cast<int*>(topk_length);
    p.stride_q_s_q = h_q * d_qk;  p.stride_q_h_q = d_qk;
    p.stride_kv_s_kv = d_qk;      p.stride_kv_h_kv = d_qk;
    p.stride_indices_s_q = topk;  p.stride_indices_h_kv = topk;
    p.out = static_cast<cutlass::bfloat16_t*>(out);
    p.max_logits = static_cast<float*>(max_logits);
    p.lse = static_cast<float*>(lse);
    p.num_sm = num_sm;
    p.stream = static_cast<cudaStream_t>(stream);
    try {
        sm90::run_fwd_kernel(p);
    } catch (const std::exception& e) {
        std::fprintf(stderr, "flashmla_sm90_sparse_fwd: %s\n", e.what());
        return -1;
    }
    return static_cast<int>(cudaGetLastError());
}
