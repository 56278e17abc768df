"""A float64, one-tensor-at-a-time reference of Stable-SPAM written from ``reference/stable_spam.md`` §2, §4 and §10.

It follows the official code's per-step order literally (weight decay, AdaClip, AdaGN, reset, Adam) with plain
Python control flow, and shares no code with ``hf_gns_spam.optim``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class ReferenceTensorState:
    m: torch.Tensor
    v: torch.Tensor
    clip_ema: float = 0.0
    norm_ema: float = 0.0
    norm_sq_ema: float = 0.0
    k: int = 0  # faithful mode's per-tensor counter


@dataclass
class ReferenceStableSPAM:
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    gamma1: float = 0.7
    gamma2: float = 0.9
    gamma3: float = 0.999
    reset_interval: int = 1000
    total_steps: int | None = None
    eta_min: float = 0.5
    mode: str = "clean"
    t: int = 0
    adam_k: int = 0  # clean mode: Adam's step since the last reset
    states: dict[int, ReferenceTensorState] = field(default_factory=dict)

    def cosine(self) -> float:
        if self.total_steps is None:
            return 1.0
        T = self.total_steps
        if self.mode == "clean":
            return self.eta_min + (1 - self.eta_min) * (1 + math.cos(math.pi * min(self.t, T) / T)) / 2
        return self.eta_min + (1 - self.eta_min) * (1 + math.cos(math.pi * self.t / (T + 1))) / 2

    def step(self, params: list[torch.Tensor], grads: list[torch.Tensor | None]) -> None:
        """Update float64 ``params`` in place from ``grads`` (None = no gradient for that tensor this step)."""
        self.t += 1
        s = self.cosine()
        b1 = self.beta1 * s
        g1 = self.gamma1 * s
        is_reset = self.reset_interval > 0 and self.t % self.reset_interval == 0
        if self.mode == "clean":
            self.adam_k = 1 if is_reset else self.adam_k + 1
        for i, (p, grad) in enumerate(zip(params, grads, strict=True)):
            if grad is None:
                continue
            g = grad.to(torch.float64).clone()
            st = self.states.setdefault(i, ReferenceTensorState(torch.zeros_like(g), torch.zeros_like(g)))
            p.mul_(1 - self.lr * self.weight_decay)
            if self.mode == "faithful":
                st.k += 1
                k_stats = st.k
            else:
                k_stats = self.t
            # AdaClip
            g_max = g.abs().max().item()
            st.clip_ema = self.gamma3 * st.clip_ema + (1 - self.gamma3) * g_max
            thr = st.clip_ema / (1 - self.gamma3**k_stats)
            spikes = g.abs() > thr
            g[spikes] = g[spikes] / g_max * thr  # the official code's boolean-mask form
            # AdaGN
            n = g.norm().item()
            if self.mode == "clean" and n == 0:
                continue  # skipped: statistics, moments and value untouched
            st.norm_ema = g1 * st.norm_ema + (1 - g1) * n
            st.norm_sq_ema = self.gamma2 * st.norm_sq_ema + (1 - self.gamma2) * n * n
            c = (st.norm_ema / (1 - g1**k_stats)) / (math.sqrt(st.norm_sq_ema / (1 - self.gamma2**k_stats)) + self.eps)
            if n > 0:
                g = g / n * c
            # MoRet + Adam
            if self.mode == "clean":
                if is_reset:
                    st.m.zero_()
                    st.v.zero_()
                k_adam = self.adam_k
                m, v = st.m, st.v
            else:
                m, v = st.m, st.v  # the official code binds the old tensors before the reset
                if is_reset:
                    st.m, st.v = torch.zeros_like(g), torch.zeros_like(g)
                    st.k = 1
                k_adam = st.k
            m.mul_(b1).add_((1 - b1) * g)
            v.mul_(self.beta2).add_((1 - self.beta2) * g * g)
            denom = v.sqrt() / math.sqrt(1 - self.beta2**k_adam) + self.eps
            p.sub_(self.lr / (1 - b1**k_adam) * m / denom)
