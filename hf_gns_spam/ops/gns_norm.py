"""The GNS-aware normalization as a ``torch.library`` custom operator with autograd.

``gns_norm(x, weight, bias, spec, statistics, segment_ids, frozen_grads)`` returns what the original normalization
module returns. Its backward returns the usual dx, dw, db and, as the gradient of ``statistics`` (a float32 leaf
tensor of shape [3] with ``requires_grad=True``), the per-example statistics of this backward pass::

    statistics.grad += [Σ_b ‖G_w[b]‖², Σ_b ‖G_b[b]‖², B]

where G_w[b] (G_b[b]) is the contribution of example b to the weight (bias) gradient. An example is a row of
dimension 0 of ``x``, or, with ``segment_ids`` (packed / padding-free batches: several sequences per row), a
sequence: ``segment_ids`` (int32 or int64, shape ``x.shape[:2]``, ``[N]`` for a 2-D x) gives each token's sequence e
in [0, E), non-decreasing in row-major order; B is then E = max + 1. See :mod:`hf_gns_spam.ops.norm_reference` for
the maths.

The spec crosses the operators whole, as one string (:meth:`NormSpec.encode`, decoded in :meth:`NormSpec.decode`
and nowhere else): ``torch.library`` operators take no dataclass, and one string keeps every signature (the two
operators, their fake implementations, the autograd context) the same when NormSpec gains a field. Under
``torch.compile`` the string is a constant of the graph (one compiled graph per spec, as for any constant).

Checks of ``segment_ids``: dtype, shape and device in :func:`gns_norm` (no value read, so ``torch.compile`` traces
it); the values (≥ 0, non-decreasing) in the forward when the ids are on the CPU (a cheap check, ``ValueError``), and
again in the pure-torch backward (a host read on an accelerator). The Triton backward on a GPU reads nothing on the
host: there, ids that fail the checks give NaN statistics. Because autograd accumulates leaf gradients, successive
backward passes (gradient accumulation, gradient checkpointing's recomputation) add up until the leaf's ``.grad`` is
reset, with no side effects inside the backward: ``torch.compile`` traces it as one opaque operator in the forward
graph and one in the backward graph. ``statistics=None`` computes no statistics at all.

Frozen parameters (peft's LoRA and QLoRA freeze the norms): ``frozen_grads=(weight_sink, bias_sink)``, float32 leaf
tensors of the weight's and the bias's shape with ``requires_grad=True`` (either may be None), receive as their
gradient the gradient the frozen weight (bias) would have had. The statistics then cover the frozen parameters too,
and the callback gets their batch gradient from the sinks; the frozen parameters themselves get no gradient.

Dispatch: CUDA tensors use the Triton kernels (:mod:`hf_gns_spam.kernels.gns_norm`) when Triton is installed; other
devices use the pure-torch reference (:mod:`hf_gns_spam.ops.norm_reference`). :func:`norm_backend` forces either.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib.util
from collections.abc import Callable, Iterator
from typing import Any, Literal

import torch

from hf_gns_spam.ops import norm_reference
from hf_gns_spam.ops.norm_reference import STATISTICS_SIZE, NormSpec, output_dtype

__all__ = ["NormSpec", "gns_norm", "norm_backend"]

Backend = Literal["auto", "torch", "triton"]
_BACKENDS: tuple[Backend, ...] = ("auto", "torch", "triton")
# the implementation in force: a context variable, so that a switch in one thread or task leaves the others alone
_backend: contextvars.ContextVar[Backend] = contextvars.ContextVar("hf_gns_spam_norm_backend", default="auto")
_TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


@contextlib.contextmanager
def norm_backend(name: Backend) -> Iterator[None]:
    """Force the implementation inside the block: ``"torch"``, ``"triton"`` (also for CPU tensors, e.g. under
    ``TRITON_INTERPRET=1``) or ``"auto"`` (Triton for CUDA tensors, torch otherwise). It is read when the forward
    and the backward run (inside the operators, so that a compiled graph does not freeze it); autograd runs a CUDA
    backward in its own thread, which sees ``"auto"``: both implementations have the same contract."""
    if name not in _BACKENDS:
        raise ValueError(f"norm backend must be one of {_BACKENDS}, got {name!r}")
    if name == "triton" and not _TRITON_AVAILABLE:
        raise RuntimeError("norm backend 'triton' requested but triton is not installed (pip install triton)")
    token = _backend.set(name)
    try:
        yield
    finally:
        _backend.reset(token)


def _resolved_backend(x: torch.Tensor) -> Literal["torch", "triton"]:
    backend = _backend.get()
    return "triton" if backend == "triton" or (backend == "auto" and x.is_cuda and _TRITON_AVAILABLE) else "torch"


def _implementation(backend: str) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """(forward, backward) of the Triton kernels or of the pure-torch reference (same contracts)."""
    if backend == "triton":
        from hf_gns_spam.kernels import gns_norm as kernels

        return kernels.gns_norm_forward, kernels.gns_norm_backward
    return norm_reference.norm_forward, norm_reference.norm_backward


@torch.library.custom_op("hf_gns_spam::gns_norm_forward", mutates_args=())
def _gns_norm_forward(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    statistics: torch.Tensor | None,
    segment_ids: torch.Tensor | None,
    weight_sink: torch.Tensor | None,
    bias_sink: torch.Tensor | None,
    spec: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, rstd); ``statistics`` and the sinks are only autograd handles for what the backward computes,
    ``segment_ids`` is saved for it (ids on the CPU are checked here, before any work); ``spec`` is
    :meth:`NormSpec.encode`'s string."""
    if segment_ids is not None and segment_ids.device.type == "cpu":
        norm_reference.check_segment_values(segment_ids)
    forward, _ = _implementation(_resolved_backend(x))
    return forward(NormSpec.decode(spec), x, weight, bias)


@_gns_norm_forward.register_fake
def _(x, weight, bias, statistics, segment_ids, weight_sink, bias_sink, spec):
    out_dtype = output_dtype(NormSpec.decode(spec), x.dtype, None if weight is None else weight.dtype)
    row_shape = x.shape[:-1]
    return (
        x.new_empty(x.shape, dtype=out_dtype),
        x.new_empty(row_shape, dtype=torch.float32),
        x.new_empty(row_shape, dtype=torch.float32),
    )


@torch.library.custom_op("hf_gns_spam::gns_norm_backward", mutates_args=())
def _gns_norm_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    segment_ids: torch.Tensor | None,
    spec: str,
    need_input_grad: bool,
    need_weight_grad: bool,
    need_bias_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dw, db, statistics); a gradient that is not needed comes back as an empty tensor of its own (outputs of
    a custom operator may not alias each other)."""
    _, backward = _implementation(_resolved_backend(x))
    dx, dw, db, statistics = backward(
        NormSpec.decode(spec),
        dy,
        x,
        weight,
        bias,
        mean,
        rstd,
        need_input_grad,
        need_weight_grad,
        need_bias_grad,
        segment_ids,
    )
    return (
        x.new_empty(0) if dx is None else dx,
        x.new_empty(0) if dw is None else dw,
        x.new_empty(0) if db is None else db,
        statistics,
    )


@_gns_norm_backward.register_fake
def _(dy, x, weight, bias, mean, rstd, segment_ids, spec, need_input, need_weight, need_bias):
    return (
        x.new_empty(x.shape) if need_input else x.new_empty(0),
        weight.new_empty(weight.shape) if need_weight else x.new_empty(0),
        bias.new_empty(bias.shape) if need_bias else x.new_empty(0),
        x.new_empty(STATISTICS_SIZE, dtype=torch.float32),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, statistics, segment_ids, _sink, _bias_sink, spec = inputs
    _, mean, rstd = output
    # without statistics the segments change nothing (dx, dw, db do not depend on them): no per-segment work
    ctx.save_for_backward(x, weight, bias, mean, rstd, segment_ids if statistics is not None else None)
    ctx.spec = spec
    ctx.has_statistics = statistics is not None


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, bias, mean, rstd, segment_ids = ctx.saved_tensors
    need_input, need_weight, need_bias = ctx.needs_input_grad[:3]
    sink_weight, sink_bias = ctx.needs_input_grad[5:7]  # frozen parameters whose gradient goes to a sink
    dx, dw, db, statistics = torch.ops.hf_gns_spam.gns_norm_backward(
        dy.contiguous(),
        x,
        weight,
        bias,
        mean,
        rstd,
        segment_ids,
        ctx.spec,
        need_input,
        need_weight or sink_weight,
        need_bias or sink_bias,
    )
    return (
        dx if need_input else None,
        dw if need_weight else None,
        db if need_bias else None,
        statistics if ctx.has_statistics else None,
        None,
        dw.float() if sink_weight else None,
        db.float() if sink_bias else None,
        None,
    )


torch.library.register_autograd("hf_gns_spam::gns_norm_forward", _backward, setup_context=_setup_context)


def gns_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    spec: NormSpec,
    statistics: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
    frozen_grads: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
) -> torch.Tensor:
    """Normalize ``x`` over its last dimension as ``spec`` says; see the module docstring for the statistics and for
    ``frozen_grads`` (the sinks of frozen parameters: a sink is refused for a parameter that requires a gradient).

    ``segment_ids`` (optional, int32/int64 of shape ``x.shape[:2]``, ``[N]`` for a 2-D x, on x's device): the
    example (sequence) of each token, in [0, E), non-decreasing in row-major order; the statistics are then per
    sequence. Only dtype, shape and device are checked here (module docstring).
    """
    if x.dim() < 2:
        raise ValueError(f"gns_norm needs an input of shape [batch, ..., features], got shape {tuple(x.shape)}")
    if bias is not None and not spec.variant.bias:
        raise ValueError(f"the variant {spec.variant.label!r} has no bias (hf_gns_spam.kernels.norm_variants)")
    if segment_ids is not None:
        norm_reference.check_segment_layout(segment_ids, x)
    weight_sink, bias_sink = frozen_grads
    for name, parameter, sink in (("weight", weight, weight_sink), ("bias", bias, bias_sink)):
        if sink is None:
            continue
        if parameter is None or parameter.requires_grad or sink.shape != parameter.shape or sink.dtype != torch.float32:
            raise ValueError(
                f"the {name} sink must be a float32 tensor of the frozen {name}'s shape; got a sink of "
                f"{tuple(sink.shape)} {sink.dtype} for a {name} of "
                f"{None if parameter is None else (tuple(parameter.shape), parameter.requires_grad)} (shape, trainable)"
            )
    y, _, _ = torch.ops.hf_gns_spam.gns_norm_forward(
        x, weight, bias, statistics, segment_ids, weight_sink, bias_sink, spec.encode()
    )
    return y
