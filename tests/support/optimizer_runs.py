"""The gradient streams the StableSPAM tests feed the optimizer and its float64 reference
(:mod:`tests.support.stable_spam_reference`), and how far two results are apart."""

from __future__ import annotations

import math

import torch

from tests.support.stable_spam_reference import ReferenceStableSPAM

SHAPES = [(12, 7), (7,), (3, 4, 5), ()]


def make_gradient_stream(steps: int, shapes=SHAPES, seed: int = 0) -> list[list[torch.Tensor | None]]:
    """Gaussian gradients with injected single-entry spikes, an all-zero gradient and a missing gradient."""
    gen = torch.Generator().manual_seed(seed)
    stream = []
    for t in range(steps):
        grads: list[torch.Tensor | None] = []
        for i, shape in enumerate(shapes):
            g = torch.randn(shape, generator=gen, dtype=torch.float64) * (1 + 0.5 * math.sin(t / 7))
            if t % 17 == 9:  # a 100x spike in one entry
                g.view(-1)[(t + i) % g.numel()] *= 100.0
            if t == 23 and i == 1:
                g.zero_()
            grads.append(None if (t == 31 and i == 2) else g)
        stream.append(grads)
    return stream


def run_reference(initial, stream, **kwargs) -> list[torch.Tensor]:
    """The float64 reference's parameters after the whole ``stream``, from ``initial``."""
    params = [p.detach().clone().to(torch.float64) for p in initial]
    ref = ReferenceStableSPAM(**kwargs)
    for grads in stream:
        ref.step(params, grads)
    return params


def initial_params(seed: int = 1) -> list[torch.Tensor]:
    """Random float64 parameters of the ``SHAPES``."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=torch.float64) for shape in SHAPES]


def max_relative_error(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> float:
    """The largest max|actual − expected| / max|expected| over the tensors."""
    return max(
        ((a.double() - e).abs().max() / e.abs().max().clamp_min(1e-12)).item()
        for a, e in zip(actual, expected, strict=True)
    )


def assert_close_scaled(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> None:
    """Same dtype and shape, and max|actual − expected| ≤ rtol · max|expected| (relative to the tensor's scale)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    a, e = actual.double(), expected.double()
    assert torch.isfinite(a).all() and torch.isfinite(e).all(), what
    scale = e.abs().max().clamp_min(1e-30)
    error = ((a - e).abs().max() / scale).item()
    assert error <= rtol, f"{what}: relative error {error:.3g} > {rtol:g}"
