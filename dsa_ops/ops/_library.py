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


def schema_defaults(name: str) -> tuple:
    """dsa::<name>'s default per argument, in schema order (None where an argument has none)."""
    return tuple(a.default_value for a in getattr(torch.ops.dsa, name).default._schema.arguments)


def with_defaults(name: str, fn: Callable, suffix: str) -> Callable:
    """Wraps `fn` so it always receives the full positional argument list of dsa::<name>.

    The dispatcher drops trailing arguments that equal their defaults; they are put back here, once, so
    checks, implementations and fakes never deal with missing arguments."""
    defaults = schema_defaults(name)
    n_args = len(defaults)

    def full_args(*args):
        if len(args) < n_args:
            args = args + defaults[len(args):]
        return fn(*args)

    full_args.__name__ = f"{name}_{suffix}"
    return full_args


def run_on(device: torch.device, fn: Callable, args: tuple):
    """fn(*args) with `device` the current CUDA device (a CPU device: as is). Triton and CuTe-DSL launch on the
    current device's current stream, so a call whose tensors sit on another GPU than the current one (a process
    that never called torch.cuda.set_device, pipeline stages in one process) would run there, on memory of
    another device; torch's own ops switch devices this way too."""
    if device.index is None or device.index == torch.cuda.current_device():
        return fn(*args)
    with torch.cuda.device(device):
        return fn(*args)


def define(name: str, schema: str, check: Callable) -> None:
    """Defines dsa::<name> with `schema` and registers its CPU and CUDA kernel."""
    LIB.define(name + schema)
    SCHEMAS[name] = name + schema

    def kernel(*args):
        check(*args)
        device = dispatch.device_of(args)
        return run_on(device, dispatch.pick(name, args, device), args)

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
        device = dispatch.device_of(inputs)
        implementation = dispatch.pick(functional, inputs, device)
        if getattr(implementation, "writes_out", False):
            run_on(device, lambda: implementation(*inputs, out=tuple(outs)), ())
            return
        for out, result in zip(outs, run_on(device, implementation, inputs)):
            out.copy_(result)

    kernel.__name__ = f"{name}_kernel"
    LIB.impl(name, kernel, "CPU")
    LIB.impl(name, kernel, "CUDA")


def _below_autograd(name: str) -> Callable:
    """dsa::<name> run past the Autograd key (`run(keyset, *args)`): what an Autograd kernel calls for the
    work itself, recording nothing."""
    op = getattr(torch.ops.dsa, name).default
    after_autograd = torch._C._after_autograd_keyset

    def run(keyset, *args):
        with torch._C._AutoDispatchBelowAutograd():
            return op.redispatch(keyset & after_autograd, *args)

    return run


def register_autograd(name: str, backward: Callable, setup_context: Callable) -> None:
    """Registers the Autograd kernel of dsa::<name>, as `torch.library.register_autograd(name, backward,
    setup_context=...)` does and with the same contract (`setup_context(ctx, inputs, output)` sees every
    argument; `ctx.needs_input_grad` has an entry per argument the dispatcher passed), without its per-call
    cost: torch's kernel puts back the arguments the dispatcher dropped by walking the schema's argument list
    through pybind on every call (`torch._library.utils.fill_defaults`, about 25 us a call on the CPU
    machine, half of the boundary's cost when inputs require grad; BENCHMARKS.md, op-boundary overhead).
    Here the defaults are read from the schema once."""
    defaults = schema_defaults(name)
    run = _below_autograd(name)

    def forward(ctx, *args):
        keyset, args = args[-1], args[:-1]      # the keyset rides last so that input positions stay the op's
        output = run(keyset, *args)
        setup_context(ctx, args + defaults[len(args):], output)
        return output

    def backward_without_keyset(ctx, *grads):
        need = ctx.needs_input_grad
        ctx.needs_input_grad = need[:-1]
        try:
            grads_in = backward(ctx, *grads)
        finally:
            ctx.needs_input_grad = need
        return (*grads_in, None) if isinstance(grads_in, tuple) else (grads_in, None)

    function = type(f"{NAMESPACE}_{name}_autograd", (torch.autograd.Function,),
                    {"forward": staticmethod(forward), "backward": staticmethod(backward_without_keyset)})

    def autograd_kernel(keyset, *args):
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
            return function.apply(*args, keyset)
        return run(keyset, *args)

    autograd_kernel.__name__ = f"{name}_autograd"
    LIB.impl(name, autograd_kernel, "Autograd", with_keyset=True)


def no_gradient(name: str) -> None:
    """Ops with no gradient: the Autograd kernel runs them below autograd, so that their outputs never require
    grad (instead of failing late in backward), at no per-call cost beyond the redispatch."""
    run = _below_autograd(name)
    run.__name__ = f"{name}_autograd"
    LIB.impl(name, run, "Autograd", with_keyset=True)


def input_grads(ctx, grads: dict) -> tuple:
    """Backward return value: `grads` maps input position -> gradient; an input that does not require grad
    gets None. The dispatcher may pass fewer inputs than the schema has (trailing defaults dropped), so the
    tuple has exactly `len(ctx.needs_input_grad)` entries."""
    need = ctx.needs_input_grad
    return tuple(grads.get(i) if need[i] else None for i in range(len(need)))
