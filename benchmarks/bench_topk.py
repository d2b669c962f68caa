"""Benchmark: Triton exact top-k (csrc_dsl/triton/topk.py) vs torch.topk (and cuDNN frontend's DSA indexer top-k
when `import cudnn` provides it).

    python -m benchmarks.bench_topk            # the two target shapes, k = 2048
    python -m benchmarks.bench_topk --all      # plus long rows, odd sizes and the sorted=True variant
    python -m benchmarks.bench_topk --sweep    # time the kernel in several launch settings (module knobs)

Each shape is checked for correctness before it is timed. Times are medians of triton.testing.do_bench (which
clears the L2 cache before every run). GB/s counts the bytes that must move: the scores read once plus the
two [R, k] outputs written.
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.common import use_roofline_of


def _cudnn_topk():
    """cuDNN frontend's DSA indexer top-k as fn(scores, k) -> indices, or None with a note."""
    from benchmarks.common import load_cudnn_dsa

    dsa, note = load_cudnn_dsa()
    if dsa is None:
        print(f"note: cuDNN frontend DSA top-k unavailable ({note}); baseline left out")
        return None
    wrapper = dsa.indexer_top_k_wrapper

    def run(scores, k, lengths):
        # the same work as ours: values too, and tie_break=1 (the smaller column wins, our rule; its default 0
        # breaks ties arbitrarily). cuDNN 1.32.0 takes k <= 2048.
        return wrapper(scores, lengths, top_k=k, next_n=1, return_val=True, tie_break=1)["indices"]

    return run


def check(ours, scores, k):
    """Values: same multiset as torch.topk, exactly. Indices: same set as torch.topk on rows whose k-th and
    (k+1)-th values differ (elsewhere torch's choice among tied values is arbitrary); on every row, the index set
    must be the exact tie rule's (verified with a stable sort on a sample of rows)."""
    idx, val = ours
    ref_val, ref_idx = torch.topk(scores, min(k + 1, scores.shape[-1]), dim=-1, sorted=True)
    n = min(k, scores.shape[-1])
    assert torch.equal(val[:, :n].sort(-1).values, ref_val[:, :n].sort(-1).values), "value multiset differs"
    if ref_val.shape[-1] > k:
        clean = ref_val[:, k - 1] != ref_val[:, k]
    else:
        clean = torch.ones(scores.shape[0], dtype=torch.bool, device=scores.device)
    same = (idx.long().sort(-1).values == ref_idx[:, :k].sort(-1).values).all(-1)
    assert bool((same | ~clean).all()), "index set differs from torch.topk on a tie-free row"
    rows = torch.arange(0, scores.shape[0], max(1, scores.shape[0] // 64), device=scores.device)
    order = torch.sort(scores[rows], dim=-1, descending=True, stable=True).indices[:, :k]
    assert torch.equal(idx[rows].long().sort(-1).values, order.sort(-1).values), "tie rule violated"
    return int((~clean).sum())


def bench_shape(rows, cols, k, do_sorted, cudnn_fn):
    import triton.testing

    from csrc_dsl.triton.topk import topk

    g = torch.Generator(device="cuda").manual_seed(rows * 7 + cols + k)
    scores = torch.randn(rows, cols, device="cuda", generator=g)
    lengths = torch.full((rows,), cols, dtype=torch.int32, device="cuda")
    ours = topk(scores, k, None, False)
    tied_rows = check(ours, scores, k)
    if do_sorted:
        s_idx, s_val = topk(scores, k, None, True)
        ref_val, _ = torch.topk(scores, k, dim=-1, sorted=True)
        assert torch.equal(s_val, ref_val), "sorted values differ from torch.topk"

    def timed(fn):
        return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")

    t_ours = timed(lambda: topk(scores, k, None, False))
    t_sorted = timed(lambda: topk(scores, k, None, True)) if do_sorted else None
    t_torch = timed(lambda: torch.topk(scores, k, dim=-1, sorted=False))
    t_cudnn = None
    if cudnn_fn is not None:
        try:
            cudnn_fn(scores, k, lengths)
            t_cudnn = timed(lambda: cudnn_fn(scores, k, lengths))
        except Exception as exc:
            print(f"note: cuDNN top-k failed at {rows}x{cols} ({type(exc).__name__}: {exc})")
    moved = rows * cols * 4 + rows * k * 8
    gbps = moved / (t_ours * 1e-3) / 1e9
    return dict(shape=f"{rows}x{cols}", k=k, ours=t_ours, sorted=t_sorted, torch=t_torch, cudnn=t_cudnn,
                gbps=gbps, tied=tied_rows)


KNOBS = ("BLOCK", "NUM_WARPS", "PROGRAMS_PER_SM", "SELECT_BLOCK", "SAMPLE", "GUESS_SIGMAS", "RADIX_BITS",
         "MAX_REGISTERS", "RESIDENT_MAX_COLS", "RESIDENT_PER_THREAD", "RESIDENT_MAX_REGISTERS",
         "RESIDENT_INTERPOLATE", "SELECT_PREFETCH")
# {knob: value} per configuration (module attributes of csrc_dsl/triton/topk.py); knobs not named keep the defaults.
SWEEP_CONFIGS = [
    dict(),                                                       # the defaults
    dict(RADIX_BITS=8, PROGRAMS_PER_SM=24, MAX_REGISTERS=None),   # the defaults until 2026-11-25 18:40 UTC
    dict(RADIX_BITS=8),
    dict(RADIX_BITS=5),
    dict(SAMPLE=512),
    dict(PROGRAMS_PER_SM=16, MAX_REGISTERS=None),
    dict(PROGRAMS_PER_SM=24, MAX_REGISTERS=80),
    # added for the H200 (2026-12-04): wider or narrower steps, two-warp programs, a tighter first guess
    dict(BLOCK=512),
    dict(BLOCK=512, PROGRAMS_PER_SM=16, MAX_REGISTERS=None),
    dict(BLOCK=128),
    dict(NUM_WARPS=2, PROGRAMS_PER_SM=16),
    dict(GUESS_SIGMAS=3.0),
    # (2026-12-05, H100: two streaming steps' loads in flight instead of one measured no faster; removed)
    # the register-resident kernel for rows <= RESIDENT_MAX_COLS (the 8192-column shape): off, and its launch
    dict(RESIDENT_MAX_COLS=0),
    dict(RESIDENT_PER_THREAD=32, RESIDENT_MAX_REGISTERS=None),
    dict(RESIDENT_PER_THREAD=16, RESIDENT_MAX_REGISTERS=None),
    dict(RESIDENT_PER_THREAD=8, RESIDENT_MAX_REGISTERS=None),
    dict(RESIDENT_PER_THREAD=8, RESIDENT_MAX_REGISTERS=64),
    dict(RESIDENT_INTERPOLATE=False),
    dict(RESIDENT_PER_THREAD=32, RESIDENT_MAX_REGISTERS=80),
    dict(RESIDENT_PER_THREAD=16, RESIDENT_MAX_REGISTERS=48),
    # (2026-12-06) the streaming kernel's buffer passes without their one-chunk prefetch
    dict(SELECT_PREFETCH=False, RESIDENT_MAX_COLS=0),   # against entry 12 (prefetch on, resident off)
    # (2026-12-06) with the guess in registers: a larger sample (a tighter first threshold, fewer buffered), wider
    # buffer passes, more programs
    dict(SAMPLE=2048),
    dict(SELECT_BLOCK=512),
    dict(PROGRAMS_PER_SM=20),
    dict(SAMPLE=2048, GUESS_SIGMAS=4.0),
]


def sweep(pick=None):
    """Time launch configurations on the two target shapes (tuning aid). Each configuration is checked first
    (check() on the timed random matrices, plus a matrix with heavy ties and -0.0/+0.0)."""
    import triton.testing

    from csrc_dsl.triton import topk as tk

    print(f"device: {torch.cuda.get_device_name()}")
    shapes = [(4096, 8192, 2048), (4096, 65536, 2048)]
    data = {}
    for rows, cols, k in shapes:
        g = torch.Generator(device="cuda").manual_seed(cols)
        data[cols] = torch.randn(rows, cols, device="cuda", generator=g)
    g = torch.Generator(device="cuda").manual_seed(99)
    ties = torch.randint(-20, 40, (2048, 65536), device="cuda", generator=g).float()  # enough rows: no split
    ties[:, ::5] = -0.0
    ties[:, 1::5] = 0.0
    defaults = {name: getattr(tk, name) for name in KNOBS}
    device_settings, tk.DEVICE_SETTINGS = tk.DEVICE_SETTINGS, {}   # the knobs below, not a GPU's tuned ones
    sorted_checked = False
    print("| settings | " + " | ".join(f"{r}x{c} ms" for r, c, _ in shapes) + " |")
    print("| --- | " + "--- | " * len(shapes))
    for knobs in (SWEEP_CONFIGS if pick is None else [SWEEP_CONFIGS[i] for i in pick]):
        for name, value in defaults.items():
            setattr(tk, name, value)
        for name, value in knobs.items():
            setattr(tk, name, value)
        settings = ", ".join(f"{n}={getattr(tk, n)}" for n in KNOBS)
        times = []
        try:
            for rows, cols, k in shapes:
                x = data[cols]
                check(tk._topk(x, k, None, False), x, k)
                times.append(triton.testing.do_bench(lambda: tk._topk(x, k, None, False),
                                                     warmup=25, rep=150, return_mode="median"))
            check(tk._topk(ties, 2048, None, False), ties, 2048)  # same compiled kernel
            if not sorted_checked:  # sorted=True compiles another kernel: checked once
                sorted_checked = True
                s_idx, _ = tk._topk(ties[:1024], 2048, None, True)
                ref = torch.sort(ties[:64], dim=-1, descending=True, stable=True).indices[:, :2048]
                assert torch.equal(s_idx[:64].long(), ref), "sorted output differs from a stable sort"
        except Exception as exc:  # report the failure, go on with the next configuration
            print(f"| {settings} | FAILED: {type(exc).__name__}: {exc} |", flush=True)
            continue
        print(f"| {settings} | " + " | ".join(f"{t:.3f}" for t in times) + " |", flush=True)
    for name, value in defaults.items():
        setattr(tk, name, value)
    tk.DEVICE_SETTINGS = device_settings


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--all", action="store_true", help="more shapes and the sorted=True variant")
    parser.add_argument("--sweep", action="store_true", help="time launch configurations instead")
    parser.add_argument("--pick", type=lambda t: [int(i) for i in t.split(",")], default=None,
                        help="--sweep: only these SWEEP_CONFIGS entries (comma-separated indices)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_topk: needs a CUDA GPU")
        return
    if args.sweep:
        sweep(args.pick)
        return
    device_name = torch.cuda.get_device_name()
    print(f"device: {device_name}")
    _, peak_gbps = use_roofline_of(device_name)
    cudnn_fn = _cudnn_topk()
    shapes = [(4096, 8192, 2048), (4096, 65536, 2048)]
    if args.all:
        shapes += [(333, 70001, 2000), (128, 1 << 20, 4096), (8, 1 << 20, 2048), (4096, 65536, 512)]
    results = [bench_shape(r, c, k, args.all, cudnn_fn) for r, c, k in shapes]

    fmt = lambda t: "-" if t is None else f"{t:.3f}"  # noqa: E731
    print()
    print("| shape | k | ours ms | torch.topk ms | torch/ours | cuDNN ms | cuDNN/ours | ours sorted ms "
          f"| GB/s | % of {peak_gbps / 1000:.1f} TB/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        cud_ratio = "-" if r["cudnn"] is None else f"{r['cudnn'] / r['ours']:.2f}x"
        print(f"| {r['shape']} | {r['k']} | {fmt(r['ours'])} | {fmt(r['torch'])} | {r['torch'] / r['ours']:.2f}x "
              f"| {fmt(r['cudnn'])} | {cud_ratio} | {fmt(r['sorted'])} | {r['gbps']:.0f} "
              f"| {100 * r['gbps'] / peak_gbps:.0f}% |")


if __name__ == "__main__":
    main()
