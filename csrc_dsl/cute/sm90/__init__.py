"""Hopper (SM90) CuTe-DSL kernels. Each module imports `cutlass` lazily, inside its kernel builders."""
