"""The math of Cross-Iteration BN as pure functions and one autograd Function.

Notation follows docs/method.md (and the paper, arXiv 2002.05712): ``y = conv(x; W)`` is the
layer input, ``mu``/``nu`` its per-channel first and second moments over ``m = N*H*W`` positions,
``dmu``/``dnu`` their derivatives with respect to the conv weight, computed in closed form with
weight-gradient routines (no second autograd pass).

Precision: everything here returns float32 (float64 for float64 inputs) whatever autocast
says (:class:`no_autocast`). Where the user's settings let float32 matmuls round their operands
(TF32, bf16), :func:`compensation_terms` multiplies by the weight in exact parts
(:func:`bf16_parts`): the compensation is a small difference of two such products. No
process-wide setting is read-modified-written.
"""
import math
from collections import OrderedDict
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import compat
from .conv_trace import ConvRecord
from .kernels import memory_format, stats_dtype

class no_autocast:
    """Autocast off inside (the small products and the statistics are float32 whatever the
    activations run in). Autocast state is per thread; nothing process-wide is changed, and
    nothing at all when autocast is off (the hot path)."""

    __slots__ = ('device_type', 'autocast')

    def __init__(self, device_type: str):
        self.device_type = device_type

    def __enter__(self):
        self.autocast = None
        if compat.autocast_enabled(self.device_type):
            self.autocast = torch.autocast(self.device_type, enabled=False)
            self.autocast.__enter__()

    def __exit__(self, *exc):
        if self.autocast is not None:
            self.autocast.__exit__(*exc)


def bf16_parts(t: Tensor) -> Tensor:
    """float32 ``t`` as (3, *t.shape) parts that sum to it exactly, each with at most 8
    significant bits: every part is exact in bfloat16 and in TF32, so a matmul that rounds its
    float32 operands to either still multiplies this operand exactly."""
    hi = (t.view(torch.int32) & -65536).view(torch.float32)      # the top 8 significant bits
    rest = t - hi                                                 # exact: at most 16 bits left
    mid = (rest.view(torch.int32) & -65536).view(torch.float32)
    return torch.stack((hi, mid, rest - mid))


_TAPS_MAX = 256  # shapes kept; a detector sees a few per layer (image sizes x FPN levels)


class _LRU(OrderedDict):
    """Tables by shape key, the least recently used dropped beyond ``_TAPS_MAX`` (a mask
    head's ``m`` changes almost every step; the FPN's few shapes stay)."""

    def get(self, key, default=None):
        value = super().get(key, default)
        if value is not default:
            self.move_to_end(key)
        return value

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        if len(self) > _TAPS_MAX:
            self.popitem(last=False)


_TAPS = _LRU()
_KRON_MAX = 1024  # maps up to this many positions use one combined tap matrix


def _tap_indicator(size_in: int, size_out: int, k: int, s: int, p: int, d: int, scale: float,
                   device, dtype) -> Tensor:
    """(k, size_in) matrix: ``scale`` where input row r is tap a of some output row.

    Depends only on shapes, so it is built once per shape and device and kept; built on
    ``device`` itself (no host-to-device copy, which would make the host wait for the device).
    """
    key = (size_in, size_out, k, s, p, d, scale, device, dtype)
    taps = _TAPS.get(key)
    if taps is None:
        def ar(n):
            return torch.arange(n, device=device)
        rows = (ar(size_out) * s)[None, :] + (ar(k) * d - p)[:, None]
        hit = (rows[:, :, None] == ar(size_in)[None, None, :]).any(1)
        taps = _TAPS[key] = hit.to(dtype) * scale
    return taps


def mean_patch(x: Tensor, kernel: Tuple[int, int], stride, padding, dilation,
               out_hw: Tuple[int, int], scale: float = 1.0, out: Optional[Tensor] = None) -> Tensor:
    """``scale`` times the sum over output positions of the im2col patch, (C_in, kh, kw), in the
    statistics dtype.

    With ``scale = 1/m`` this is ``d mu / d W`` of every output channel of the group. It is
    separable in rows and columns: one pass over ``x`` (the batch sum) plus two small matmuls.
    """
    dt = stats_dtype(x.dtype)
    xs = x.sum(0, dtype=dt)                                               # (C, H, W)
    h, w = x.shape[2:]
    if h * w <= _KRON_MAX:  # small maps: both taps in one (H*W, kh*kw) matrix, one matmul
        key = ('kron', h, w, out_hw, tuple(kernel), tuple(stride), tuple(padding),
               tuple(dilation), scale, x.device, dt)
        taps = _TAPS.get(key)
        if taps is None:
            r = _tap_indicator(h, out_hw[0], kernel[0], stride[0], padding[0], dilation[0], 1.0, x.device, dt)
            c = _tap_indicator(w, out_hw[1], kernel[1], stride[1], padding[1], dilation[1], scale, x.device, dt)
            taps = _TAPS[key] = torch.kron(r, c).t().contiguous()              # (H*W, kh*kw)
        if out is not None:
            out = out.view(xs.shape[0], -1)
        with no_autocast(x.device.type):
            return torch.matmul(xs.view(xs.shape[0], -1), taps, out=out).view(-1, *kernel)
    rows = _tap_indicator(x.shape[2], out_hw[0], kernel[0], stride[0], padding[0], dilation[0],
                          1.0, x.device, dt)                              # (kh, H)
    cols = _tap_indicator(x.shape[3], out_hw[1], kernel[1], stride[1], padding[1], dilation[1],
                          scale, x.device, dt)                            # (kw, W)
    with no_autocast(x.device.type):
        return torch.matmul(torch.matmul(rows, xs), cols.t(), out=out)    # (C, kh, kw)


def _fp16_scales(m: int) -> Tuple[float, float]:
    """Powers of two for grad_output and input of the fp16 weight-gradient conv: their product is
    about 1/m, so its output is about E[y x] (fp16 overflows at 65504; unscaled it is m E[y x])."""
    e = max(math.ceil(math.log2(max(m, 1))), 0)
    return 2.0 ** -(e // 2), 2.0 ** -(e - e // 2)


def derivatives(rec: ConvRecord, y: Tensor, normalize: bool = True,
                out: Optional[Tensor] = None) -> Tensor:
    """Closed-form weight derivatives as one (C + G, K) tensor: rows ``0..C-1`` are ``d nu/dW``
    per output channel, rows ``C..C+G-1`` are ``d mu/dW`` per conv group (shared by its channels).

    ``K = C_in/groups * kh * kw``; statistics dtype (float32, or float64 for float64 inputs).
    ``d nu/dW`` is the conv's weight gradient for the output gradient ``2y/m``: one extra
    weight-gradient convolution in the activations' dtype, nothing kept alive afterwards.
    ``normalize=False`` returns ``m`` times both (sums, which SyncCBN adds across processes).
    ``out``: a (C + G, K) tensor to write into (saves an allocation per call).
    """
    n, c = y.shape[:2]
    m = n * y.shape[2] * y.shape[3]
    dt = stats_dtype(y.dtype)
    w, x = rec.saved_weight, rec.input
    groups, k = rec.groups, w.numel() // w.shape[0]
    if out is None:
        out = torch.empty(c + groups, k, dtype=dt, device=y.device)
    if m == 0:
        return out.zero_()
    div = m if normalize else 1
    with torch.no_grad(), no_autocast(y.device.type):
        mean_patch(x, tuple(w.shape[2:]), rec.stride, rec.padding, rec.dilation,
                   tuple(y.shape[2:]), 1.0 / div, out=out[c:].view(-1, *w.shape[2:]))
        grad_out = y if y.dtype == x.dtype else y.to(x.dtype)
        factor = 2.0 / div
        if x.dtype == torch.float16:
            s_y, s_x = _fp16_scales(m)
            grad_out, x, factor = grad_out * s_y, x * s_x, factor / (s_y * s_x)
        dnu = torch.ops.aten.convolution_backward(
            grad_out, x, w, None, list(rec.stride), list(rec.padding), list(rec.dilation),
            False, [0, 0], groups, [False, True, False])[1]
        torch.mul(dnu.reshape(c, k).to(dt), factor, out=out[:c])
    return out


def weight_derivatives(rec: ConvRecord, y: Tensor, normalize: bool = True) -> Tuple[Tensor, Tensor]:
    """``(d mu/dW per group (G, K), d nu/dW per channel (C, K))``: views of :func:`derivatives`."""
    d = derivatives(rec, y, normalize)
    return d[y.shape[1]:], d[:y.shape[1]]


def compensation_terms(derivs: Tensor, weight: Tensor) -> Tensor:
    """``<d mu/dW[g(j)], W[j]>`` and ``<d nu/dW[j], W[j]>`` per channel ``j`` and slot: (E, 2, C).

    derivs: (C + G, E, K) in the layout of :func:`derivatives` (E slots), weight: (C, K). One
    batched matrix-vector product for ``nu`` (per channel) and one small matmul for ``mu`` (its
    derivative is shared by the channels of a group), autocast off. The compensation is a small
    difference of two such terms with the same ``d``: where float32 matmuls may round their
    operands (TF32, bf16), ``W`` enters as :func:`bf16_parts` (three products summed), so only
    ``d`` is rounded, the same way in both terms, and the difference keeps float32 accuracy.
    """
    c, k = weight.shape
    g, e = derivs.shape[0] - c, derivs.shape[1]
    w = weight.to(derivs.dtype)
    with no_autocast(w.device.type):
        if w.dtype == torch.float32 and compat.reduced_matmul_precision(w.device.type):
            parts = bf16_parts(w)                                                       # (3, C, K)
            p_nu = torch.bmm(derivs[:c], parts.permute(1, 2, 0)).sum(2)                 # (C, E)
            p_mu = torch.matmul(parts.view(3, g, c // g, k), derivs[c:].transpose(1, 2)).sum(0)
        else:
            # w as (C, K, 1) with strides (K, 1, K): BLAS takes a fast path for it (not (K, 1, 1))
            p_nu = torch.bmm(derivs[:c], w.view(c, 1, k).transpose(1, 2))             # (C, E, 1)
            p_mu = torch.matmul(w.view(g, c // g, k), derivs[c:].transpose(1, 2))     # (G, C/G, E)
    return torch.stack((p_mu.view(c, e), p_nu.view(c, e))).permute(2, 0, 1)


def project(dmu: Tensor, dnu: Tensor, weight: Tensor) -> Tuple[Tensor, Tensor]:
    """``(<dmu, W>, <dnu, W>)`` per channel for one iteration's derivatives (G, K) / (C, K)."""
    p = compensation_terms(torch.cat((dnu, dmu))[:, None], weight)[0]
    return p[0], p[1]


_ZEROS: dict = {}


def _zero(t: Tensor) -> Tensor:
    """A cached 0-d zero of ``t``'s dtype and device (``where(c, x, 0)`` would build one per call)."""
    key = (t.dtype, t.device)
    z = _ZEROS.get(key)
    if z is None:
        z = _ZEROS[key] = torch.zeros((), dtype=t.dtype, device=t.device)
    return z


_FACTORS = _LRU()


def window_factors(m: int, slots: int, dtype, device) -> Tuple[Tensor, Tensor]:
    """Per number ``j`` of valid stored slots (``n = j + 1`` pooled iterations): a float row
    ``[1/n, 1, n m / (n m - 1), n m]`` and the int32 count ``n m``. Depends only on shapes, so
    it is built once (on ``device``: no host-to-device copy) and indexed with the device-side
    ``j`` (no host sync)."""
    key = (m, slots, dtype, device)
    tabs = _FACTORS.get(key)
    if tabs is None:
        n = torch.arange(1, slots + 2, dtype=torch.float64, device=device)
        c = n * m
        rows = torch.stack((1 / n, torch.ones_like(n), c / (c - 1).clamp_min(1), c), 1)
        tabs = _FACTORS[key] = (rows.to(dtype), c.to(torch.int32))
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
    processes (SyncCBN); ``on_backward`` (optional) is called when the backward runs.
    """

    @staticmethod
    def forward(ctx, y, weight, bias, mean, invstd, var, eps, counts, kernels, all_reduce=None,
                on_backward=None):
        out = kernels.normalize(y, weight, bias, mean, invstd, var, eps)
        ctx.save_for_backward(y, weight, mean, invstd, *counts)
        ctx.kernels, ctx.all_reduce, ctx.on_backward = kernels, all_reduce, on_backward
        return out

    @staticmethod
    def backward(ctx, g):
        if ctx.on_backward is not None:
            ctx.on_backward()
        y, weight, mean, invstd, *counts = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        g = g.contiguous(memory_format=memory_format(y))
        grad_x, grad_w, grad_b = ctx.kernels.backward(g, y, weight, mean, invstd, counts,
                                                      ctx.all_reduce, *needs)
        if weight is not None:
            grad_w = grad_w.to(weight.dtype) if needs[1] else None
            grad_b = grad_b.to(weight.dtype) if needs[2] else None
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None, None


def non_finite(a: Tensor, b: Optional[Tensor] = None) -> Tensor:
    """A 0-d bool tensor: some value of ``a`` (or of ``b``, same shape) is NaN or infinite; no
    host sync. (One sum: NaN and +-inf propagate into it; only sums beyond the dtype's range, far
    outside any statistics, would also count as non-finite.)"""
    total = (a if b is None else a + b).sum()
    return (total * 0) != 0
