"""The one place that turns a schema + a check into a `torch.ops.dsa.<op>` with device kernels.

Every op gets the same CPU/CUDA kernel: validate the arguments, ask the dispatch table for an
implementation, call it. Fakes live in `meta_kernels/`, autograd formulas next to each op family.
"""
from __future__ import annotations

from typing import Callable

import torch

from .. import dispatch

NAMESPACE = "dsa"
LIB = torch.library.Library(NAMESPACE, "DEF")

# name -> schema string, in definition order (pinned by compile_tests/test_schemas.py)
SCHEMAS: dict[str, str] = {}


def with_defaults(name: str, fn: Callable, suffix: str) -> Callable:
    """Wraps `fn` so it always receives the full positional argument list of dsa::<name>.

    The dispatcher drops trailing arguments that equal their defaults; they are put back here, once, so
    checks, implementations and fakes never deal with missing arguments."""
    op = getattr(torch.ops.dsa, name).default
    defaults = tuple(a.default_value for a in op._schema.arguments)
    n_args = len(defaults)

    def full_args(*args):
        if len(args) < n_args:
            args = args + defaults[len(args):]
        return fn(*args)

    full_args.__name__ = f"{name}_{suffix}"
    return full_args


def define(name: str, schema: str, check: Callable) -> None:
    """Defines dsa::<name> with `schema` and registers its CPU and CUDA kernel."""
    LIB.define(name + schema)
    SCHEMAS[name] = name + schema

    def kernel(*args):
        check(*args)
        return dispatch.pick(name, args)(*args)

    kernel = with_defaults(name, kernel, "kernel")
    LIB.impl(name, kernel, "CPU")
    LIB.impl(name, kernel, "CUDA")


def define_out_variant(name: str, functional: str, schema: str, check: Callable) -> None:
    """Defines dsa::<name>, the preallocated-output form of dsa::<functional>: the same leading arguments
    (all explicit) followed by the output tensors, written in place. For CUDA graphs that must reuse fixed
    buffers. The implementation is the functional op's (same dispatch row): one marked `writes_out` takes the
    buffers as `out=` and writes them directly; the others' results are copied in."""
    LIB.define(name + schema)
    SCHEMAS[name] = name + schema
    n_inputs = len(getattr(torch.ops.dsa, functional).default._schema.arguments)

    def kernel(*args):
        check(*args)
        inputs, outs = args[:n_inputs], args[n_inputs:]
        implementation = dispatch.pick(functional, inputs)
        if getattr(implementation, "writes_out", False):
            implementation(*inputs, out=tuple(outs))
            return
        for out, result in zip(outs, implementation(*inputs)):
            out.copy_(result)

    kernel.__name__ = f"{name}_kernel"
    LIB.impl(name, kernel, "CPU")
    LIB.impl(name, kernel, "CUDA")


def no_gradient(name: str) -> None:
    """Outputs of ops with no gradient never require grad (instead of failing late in backward)."""

    def setup_context(ctx, inputs, output):
        outs = output if isinstance(output, tuple) else (output,)
        ctx.mark_non_differentiable(*outs)

    def backward(ctx, *grads):
        raise RuntimeError(f"dsa.{name} has no gradient")  # unreachable: outputs are non-differentiable

    torch.library.register_autograd(f"{NAMESPACE}::{name}", backward, setup_context=setup_context, lib=LIB)


def input_grads(ctx, grads: dict) -> tuple:
    """Backward return value: `grads` maps input position -> gradient; an input that does not require grad
    gets None. The dispatcher may pass fewer inputs than the schema has (trailing defaults dropped), so the
    tuple has exactly `len(ctx.needs_input_grad)` entries."""
    need = ctx.needs_input_grad
    return tuple(grads.get(i) if need[i] else None for i in range(len(need)))
