"""The math of Cross-Iteration BN as pure functions and one autograd Function.

Notation follows docs/method.md (and the paper, arXiv 2002.05712): ``y = conv(x; W)`` is the
layer input, ``mu``/``nu`` its per-channel first and second moments over ``m = N*H*W`` positions,
``dmu``/``dnu`` their derivatives with respect to the conv weight, computed in closed form with
weight-gradient routines (no second autograd pass).

Precision: everything here returns float32 (float64 for float64 inputs) whatever autocast or
TF32 say. Small products run in float64 or as elementwise sums, never as float32 ``matmul``
(autocast would run it in fp16/bf16, TF32 would round its operands to 10 bits).
"""
import math
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from .conv_trace import ConvRecord
from .kernels import memory_format, stats_dtype

_TAPS: dict = {}
_TAPS_MAX = 256  # shapes kept; a detector sees a few per layer (image sizes x FPN levels)


def _tap_indicator(size_in: int, size_out: int, k: int, s: int, p: int, d: int, scale: float,
                   device) -> Tensor:
    """(k, size_in) float64 matrix: ``scale`` where input row r is tap a of some output row.

    Depends only on shapes, so it is built once per shape and device and kept.
    """
    key = (size_in, size_out, k, s, p, d, scale, device)
    taps = _TAPS.get(key)
    if taps is None:
        if len(_TAPS) >= _TAPS_MAX:
            _TAPS.clear()
        rows = (torch.arange(size_out) * s)[None, :] + (torch.arange(k) * d - p)[:, None]
        hit = (rows[:, :, None] == torch.arange(size_in)[None, None, :]).any(1)
        taps = _TAPS[key] = (hit.to(torch.float64) * scale).to(device)
    return taps


def mean_patch(x: Tensor, kernel: Tuple[int, int], stride, padding, dilation,
               out_hw: Tuple[int, int], scale: float = 1.0) -> Tensor:
    """``scale`` times the sum over output positions of the im2col patch, (C_in, kh, kw) float64.

    With ``scale = 1/m`` this is ``d mu / d W`` of every output channel of the group. It is
    separable in rows and columns: one pass over ``x`` (the batch sum) plus two small float64
    matmuls (exact enough, and out of reach of autocast and TF32).
    """
    xs = x.sum(0, dtype=torch.float64)                                   # (C, H, W)
    rows = _tap_indicator(x.shape[2], out_hw[0], kernel[0], stride[0], padding[0], dilation[0],
                          1.0, x.device)                                 # (kh, H)
    cols = _tap_indicator(x.shape[3], out_hw[1], kernel[1], stride[1], padding[1], dilation[1],
                          scale, x.device)                               # (kw, W)
    return torch.matmul(torch.matmul(rows, xs), cols.t())                 # (C, kh, kw)


def _fp16_scales(m: int) -> Tuple[float, float]:
    """Powers of two for grad_output and input of the fp16 weight-gradient conv: their product is
    about 1/m, so its output is about E[y x] (fp16 overflows at 65504; unscaled it is m E[y x])."""
    e = max(math.ceil(math.log2(max(m, 1))), 0)
    return 2.0 ** -(e // 2), 2.0 ** -(e - e // 2)


def weight_derivatives(rec: ConvRecord, y: Tensor, normalize: bool = True) -> Tuple[Tensor, Tensor]:
    """Closed-form ``d mu/dW`` per group, shape (G, K), and ``d nu/dW``, shape (C, K).

    ``K = C_in/groups * kh * kw``; statistics dtype (float32, or float64 for float64 inputs).
    ``d nu/dW`` is the conv's weight gradient for the output gradient ``2y/m``: one extra
    weight-gradient convolution in the activations' dtype, nothing kept alive afterwards.
    ``normalize=False`` returns ``m`` times both (sums, which SyncCBN adds across processes).
    """
    n, c = y.shape[:2]
    m = n * y.shape[2] * y.shape[3]
    dt = stats_dtype(y.dtype)
    w, x = rec.saved_weight, rec.input
    groups, k = rec.groups, w[0].numel()
    if m == 0:
        return (torch.zeros(groups, k, dtype=dt, device=y.device),
                torch.zeros(c, k, dtype=dt, device=y.device))
    div = m if normalize else 1
    with torch.autocast(y.device.type, enabled=False):
        dmu = mean_patch(x, tuple(w.shape[2:]), rec.stride, rec.padding, rec.dilation,
                         tuple(y.shape[2:]), 1.0 / div).reshape(groups, k).to(dt)
        grad_out = y if y.dtype == x.dtype else y.to(x.dtype)
        factor = 2.0 / div
        if x.dtype == torch.float16:
            s_y, s_x = _fp16_scales(m)
            grad_out, x, factor = grad_out * s_y, x * s_x, factor / (s_y * s_x)
        dnu = torch.ops.aten.convolution_backward(
            grad_out, x, w, None, list(rec.stride), list(rec.padding), list(rec.dilation),
            False, [0, 0], groups, [False, True, False])[1]
    return dmu, dnu.reshape(c, k).to(dt).mul_(factor)


def compensation_terms(dmu: Sequence[Tensor], dnu: Sequence[Tensor], weight: Tensor) -> Tensor:
    """``<dmu[g(j)], W[j]>`` and ``<dnu[j], W[j]>`` per channel ``j`` and slot, as (E, 2, C).

    dmu: pieces (G, E_i, K), dnu: pieces (C, E_i, K) (slots ``E = sum E_i``, in order), weight:
    (C, K). One concatenation, one elementwise product and one sum in the derivatives' dtype for
    both moments and every slot: no matmul, so neither autocast nor TF32 can round them (the
    compensation is a small difference of two such terms).
    """
    c, k = weight.shape
    g = dmu[0].shape[0]
    e = sum(t.shape[1] for t in dmu)
    pieces = [t.view(g, 1, t.shape[1], k).expand(g, c // g, t.shape[1], k) for t in dmu]
    pieces += [t.view(g, c // g, t.shape[1], k) for t in dnu]
    d = torch.cat(pieces, 2)
    with torch.autocast(weight.device.type, enabled=False):
        p = (d * weight.to(d.dtype).view(g, c // g, 1, k)).sum(-1)         # (G, C/G, 2E)
    return p.view(c, 2, e).permute(2, 1, 0)


def project(dmu: Tensor, dnu: Tensor, weight: Tensor) -> Tuple[Tensor, Tensor]:
    """``(<dmu, W>, <dnu, W>)`` per channel for one iteration's derivatives (G, K) / (C, K)."""
    p = compensation_terms([dmu[:, None]], [dnu[:, None]], weight)[0]
    return p[0], p[1]


_ZEROS: dict = {}


def _zero(t: Tensor) -> Tensor:
    """A cached 0-d zero of ``t``'s dtype and device (``where(c, x, 0)`` would build one per call)."""
    key = (t.dtype, t.device)
    z = _ZEROS.get(key)
    if z is None:
        z = _ZEROS[key] = torch.zeros((), dtype=t.dtype, device=t.device)
    return z


_FACTORS: dict = {}


def window_factors(m: int, slots: int, dtype, device) -> Tuple[Tensor, Tensor]:
    """Per number ``j`` of valid stored slots (``n = j + 1`` pooled iterations): a float row
    ``[1/n, 1, n m / (n m - 1), n m]`` and the int32 count ``n m``. Depends only on shapes, so
    it is built once and indexed with the device-side ``j`` (no host sync)."""
    key = (m, slots, dtype, device)
    tabs = _FACTORS.get(key)
    if tabs is None:
        if len(_FACTORS) >= _TAPS_MAX:
            _FACTORS.clear()
        n = torch.arange(1, slots + 2, dtype=torch.float64)
        c = n * m
        rows = torch.stack((1 / n, torch.ones_like(n), c / (c - 1).clamp_min(1), c), 1)
        tabs = _FACTORS[key] = (rows.to(device=device, dtype=dtype),
                                c.to(device=device, dtype=torch.int32))
    return tabs


def pool(current: Tensor, past: Tensor, valid: Tensor, factors: Tensor) -> Tensor:
    """Window mean and biased variance as one (2, C) tensor.

    current: (2, C) ``(mu, nu)`` of this iteration; past: (E, 2, C) compensated stored moments
    (not modified); valid: (E,) bool; ``factors``: ``1/n`` for the number
    ``n`` of pooled iterations. Every stored second moment is raised to at least ``mu_hat^2``
    (a non-negative variance per iteration). Invalid slots may hold NaN: they are masked with
    ``where``, never multiplied by 0.
    """
    masked = torch.where(valid.view(-1, 1, 1), past, _zero(past))
    mu, nu = masked.unbind(1)
    torch.maximum(nu, mu * mu, out=nu)
    s = masked.sum(0).add_(current).mul_(factors)
    s[1].addcmul_(s[0], s[0], value=-1).clamp_min_(0)
    return s


class CountNormalize(torch.autograd.Function):
    """``(y - mean) * invstd * weight + bias`` whose backward is BN's with element count ``n*m``.

    ``mean`` and ``invstd`` are computed outside from ``y`` and constants (the stored window):
    their dependence on ``y`` is ``d mean/dy_i = 1/(n m)`` and ``d var/dy_i = 2(y_i-mean)/(n m)``,
    which is exactly BatchNorm over ``n*m`` elements of which only ``y`` carries gradient.
    ``kernels`` is the kernel set (:mod:`.kernels`), ``counts`` what its backward needs to know
    of ``n`` (and ``n*m``); ``all_reduce`` (optional) sums the two backward reductions across
    processes (SyncCBN).
    """

    @staticmethod
    def forward(ctx, y, weight, bias, mean, invstd, var, eps, counts, kernels, all_reduce=None):
        out = kernels.normalize(y, weight, bias, mean, invstd, var, eps)
        ctx.save_for_backward(y, weight, mean, invstd, *counts)
        ctx.kernels, ctx.all_reduce = kernels, all_reduce
        return out

    @staticmethod
    def backward(ctx, g):
        y, weight, mean, invstd, *counts = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        g = g.contiguous(memory_format=memory_format(y))
        grad_x, grad_w, grad_b = ctx.kernels.backward(g, y, weight, mean, invstd, counts,
                                                      ctx.all_reduce, *needs)
        if weight is not None:
            grad_w = grad_w.to(weight.dtype) if needs[1] else None
            grad_b = grad_b.to(weight.dtype) if needs[2] else None
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None


def non_finite(a: Tensor, b: Optional[Tensor] = None) -> Tensor:
    """A 0-d bool tensor: some value of ``a`` (or of ``b``, same shape) is NaN or infinite; no
    host sync. (One sum: NaN and +-inf propagate into it; only sums beyond the dtype's range, far
    outside any statistics, would also count as non-finite.)"""
    total = (a if b is None else a + b).sum()
    return (total * 0) != 0
