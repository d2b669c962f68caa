"""Drive one top-k shape for a profiler (ncu): a few warm-up calls, then the call to profile.

    ncu -k regex:_stream_topk_kernel --launch-skip 3 --launch-count 1 --set full \
        python -m tools.profile_topk ROWS COLS K [variant]
"""
import sys

import torch

from csrc_dsl.triton.topk import _topk


def main():
    rows, cols, k = (int(a) for a in sys.argv[1:4])
    variant = sys.argv[4] if len(sys.argv) > 4 else None
    x = torch.randn(rows, cols, device="cuda", generator=torch.Generator("cuda").manual_seed(cols))
    for _ in range(4):
        _topk(x, k, None, False, variant=variant)
    torch.cuda.synchronize()
    print(f"profiled top-k {rows}x{cols} k={k} variant={variant or 'default'}")


if __name__ == "__main__":
    main()
