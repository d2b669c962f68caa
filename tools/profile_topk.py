"""Drive one top-k shape for a profiler (ncu): a few warm-up calls, then the call to profile.

    ncu -k regex:_stream_topk_kernel --launch-skip 3 --launch-count 1 --set full \
        python -m tools.profile_topk ROWS COLS K [KNOB=VALUE ...]   # e.g. RADIX_BITS=8 MAX_REGISTERS=80
"""
import sys

import torch

from csrc_dsl.triton import topk as tk


def main():
    rows, cols, k = (int(a) for a in sys.argv[1:4])
    rest = sys.argv[4:]
    for knob in rest:  # module-level launch settings of csrc_dsl/triton/topk.py
        name, value = knob.split("=")
        setattr(tk, name, type(getattr(tk, name))(value) if getattr(tk, name) is not None else int(value))
    x = torch.randn(rows, cols, device="cuda", generator=torch.Generator("cuda").manual_seed(cols))
    for _ in range(4):
        tk._topk(x, k, None, False)
    torch.cuda.synchronize()
    print(f"profiled top-k {rows}x{cols} k={k} {' '.join(rest)}")


if __name__ == "__main__":
    main()
