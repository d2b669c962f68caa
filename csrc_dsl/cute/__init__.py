"""CuTe-DSL kernels (nvidia-cutlass-dsl).

common/  the shared machinery: availability check, compile cache (memory + disk), stream, warm-up, and
         the fake-tensor compile used to inspect kernels (PTX, cubin, registers, SASS) without a GPU.
sm90/    Hopper kernels, one file per op family.

Nothing here imports `cutlass` at module import time, so `import csrc_dsl.cute...` works (and reports
why it cannot run) on machines without the DSL.
"""
