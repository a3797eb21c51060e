"""The math of Cross-Iteration BN as pure functions and one autograd Function.

Notation follows docs/method.md (and the paper, arXiv 2002.05712): ``y = conv(x; W)`` is the
layer input, ``mu``/``nu`` its per-channel first and second moments over ``m = N*H*W`` positions,
``dmu``/``dnu`` their derivatives with respect to the conv weight, computed in closed form with
weight-gradient routines (no second autograd pass).
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .conv_trace import ConvRecord

_DIMS = (0, 2, 3)


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are kept in at least float32 (float64 inputs keep float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def batch_moments(y: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel mean ``mu`` and mean of squares ``nu`` of a (N, C, H, W) tensor."""
    if y.is_cuda and y.dtype != torch.float64:
        mean, invstd = torch.batch_norm_stats(y, 0.0)  # one fused Welford pass
        return mean, invstd.pow(-2) + mean * mean
    # On CPU two plain sums beat var_mean's strided Welford reduction by ~10x.
    y = y.to(stats_dtype(y.dtype))
    m = y.numel() // y.shape[1]
    return y.sum(_DIMS) / m, (y * y).sum(_DIMS) / m


def _tap_indicator(size_in: int, size_out: int, k: int, s: int, p: int, d: int,
                   device, dtype) -> Tensor:
    """(k, size_in) 0/1 matrix: entry [a, r] says input row r is tap a of some output row."""
    rows = (torch.arange(size_out, device=device) * s)[None, :] + \
        (torch.arange(k, device=device) * d - p)[:, None]
    hit = rows[:, :, None] == torch.arange(size_in, device=device)[None, None, :]
    return hit.any(1).to(dtype)


def mean_patch(x: Tensor, kernel: Tuple[int, int], stride, padding, dilation,
               out_hw: Tuple[int, int]) -> Tensor:
    """Sum over output positions of the im2col patch, shape (C_in, kh, kw); zero padding included.

    This is ``m * d mu / d W`` of every output channel of the group. It is separable in rows and
    columns, so it costs one pass over ``x`` (the batch sum) plus two small matmuls.
    """
    dt = stats_dtype(x.dtype)
    xs = x.sum(0, dtype=dt)                                   # (C, H, W)
    rows = _tap_indicator(x.shape[2], out_hw[0], kernel[0], stride[0], padding[0], dilation[0],
                          x.device, dt)                       # (kh, H)
    cols = _tap_indicator(x.shape[3], out_hw[1], kernel[1], stride[1], padding[1], dilation[1],
                          x.device, dt)                       # (kw, W)
    return torch.matmul(torch.matmul(rows, xs), cols.t())      # (C, kh, kw)


def weight_derivatives(rec: ConvRecord, y: Tensor, normalize: bool = True) -> Tuple[Tensor, Tensor]:
    """Closed-form ``d mu/dW`` per group, shape (G, K), and ``d nu/dW``, shape (C, K).

    ``K = C_in/groups * kh * kw``. ``d nu/dW`` is the conv's weight gradient for the output
    gradient ``2y/m``: one extra weight-gradient convolution, nothing kept alive afterwards.
    ``normalize=False`` returns ``m`` times both (sums, which SyncCBN adds across processes).
    """
    n, c = y.shape[:2]
    m = n * y.shape[2] * y.shape[3]
    dt = stats_dtype(y.dtype)
    w, x = rec.saved_weight, rec.input
    groups = rec.groups
    k = w[0].numel()
    dmu = mean_patch(x, tuple(w.shape[2:]), rec.stride, rec.padding, rec.dilation,
                     tuple(y.shape[2:]))
    div = m if normalize else 1
    dmu = dmu.reshape(groups, k) / div
    # Half-precision sums over m positions can overflow: scale y by 1/sqrt(m) first.
    scale = 1.0 if y.element_size() >= 4 else max(m, 1) ** -0.5
    grad_out = y if scale == 1.0 else y * scale
    if grad_out.dtype != x.dtype:
        grad_out = grad_out.to(x.dtype)
    dnu = torch.ops.aten.convolution_backward(
        grad_out, x, w, None, list(rec.stride), list(rec.padding), list(rec.dilation),
        False, [0, 0], groups, [False, True, False])[1]
    dnu = dnu.reshape(c, k).to(dt) * (2.0 / (div * scale))
    return dmu, dnu


def project(dmu: Tensor, dnu: Tensor, weight: Tensor) -> Tuple[Tensor, Tensor]:
    """``<dmu[g(j)], W[j]>`` and ``<dnu[j], W[j]>`` per channel ``j`` (leading dims of dmu/dnu kept).

    dmu: (G, ..., K), dnu: (C, ..., K), weight: (C, K). Returns two (..., C) tensors.
    """
    c, k = weight.shape
    g = dmu.shape[0]
    w = weight.to(dnu.dtype)
    lead = dnu.shape[1:-1]
    wd_nu = torch.matmul(dnu.reshape(c, -1, k), w.unsqueeze(-1)).reshape(c, -1)   # (C, E)
    wd_mu = torch.matmul(w.reshape(g, c // g, k), dmu.reshape(g, -1, k).transpose(1, 2))  # (G, C/G, E)
    wd_mu = wd_mu.reshape(c, -1)
    return wd_mu.t().reshape(*lead, c), wd_nu.t().reshape(*lead, c)


def window_sums(past_mu: Optional[Tensor], past_nu: Optional[Tensor],
                valid: Optional[Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
    """Sums over the stored iterations of ``mu_hat`` and ``max(nu_hat, mu_hat^2)``, and how many.

    past_mu/past_nu: (E, C) compensated moments, valid: (E,) 0/1. The max keeps every stored
    variance non-negative. Returns fresh tensors (no views of the window buffers).
    """
    v = (valid > 0).unsqueeze(1)  # masked with where: an invalid slot may hold NaN
    return (torch.where(v, past_mu, 0).sum(0),
            torch.where(v, torch.maximum(past_nu, past_mu * past_mu), 0).sum(0),
            valid.sum().to(past_mu.dtype))


def aggregate(mu: Tensor, nu: Tensor, sums: Optional[Tuple[Tensor, Tensor, Tensor]]
              ) -> Tuple[Tensor, Tensor, Tensor]:
    """Window mean, biased variance and number of pooled iterations ``n`` (a tensor: no sync).

    ``sums`` comes from :func:`window_sums`; None means an empty window (plain BN statistics).
    """
    if sums is None:
        return mu, (nu - mu * mu).clamp_min_(0), torch.ones((), dtype=mu.dtype, device=mu.device)
    s_mu, s_nu, count = sums
    n = count + 1
    mean = (mu + s_mu) / n
    return mean, ((nu + s_nu) / n - mean * mean).clamp_min_(0), n


class CountNormalize(torch.autograd.Function):
    """``(y - mean) * invstd * weight + bias`` whose backward is BN's with element count ``count``.

    ``mean`` and ``invstd`` are computed outside from ``y`` and constants (the stored window):
    their dependence on ``y`` is ``d mean/dy_i = 1/count`` and ``d var/dy_i = 2(y_i-mean)/count``,
    which is exactly BatchNorm over ``count`` elements of which only ``y`` carries gradient.
    ``all_reduce`` (optional) sums the two backward reductions across processes (SyncCBN).
    """

    @staticmethod
    def forward(ctx, y, weight, bias, mean, invstd, count, all_reduce=None):
        if y.is_cuda:
            out = torch.batch_norm_elemt(y, weight, bias, mean, invstd, 0.0)
        else:  # BN's eval kernel is the fastest fused elementwise pass on CPU
            out = torch.batch_norm(y, weight, bias, mean, invstd.pow(-2), False, 0.0, 0.0, False)
        ctx.save_for_backward(y, weight, mean, invstd, count)
        ctx.all_reduce = all_reduce
        return out

    @staticmethod
    def backward(ctx, g):
        y, weight, mean, invstd, count = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        g = g.contiguous()
        if y.is_cuda:
            sum_dy, sum_dy_xmu, grad_w, grad_b = torch.batch_norm_backward_reduce(
                g, y, mean, invstd, weight, need_x, need_w, need_b)
        elif y.numel() == 0:  # (SyncCBN, empty local batch) the CPU kernel cannot take it
            sum_dy = sum_dy_xmu = grad_w = grad_b = mean.new_zeros(mean.shape)
        else:
            var = invstd.pow(-2)
            _, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
                g, y, weight, mean, var, None, None, False, 0.0, [False, True, True])
            sum_dy, sum_dy_xmu = grad_b, grad_w / invstd
        grad_x = None
        if need_x:
            if ctx.all_reduce is not None:
                sum_dy, sum_dy_xmu = ctx.all_reduce(sum_dy, sum_dy_xmu)
            if y.is_cuda:
                grad_x = torch.batch_norm_backward_elemt(
                    g, y, mean, invstd, weight, sum_dy, sum_dy_xmu, count.to(torch.int32).view(1))
            else:
                k1 = invstd if weight is None else invstd * weight
                a = -k1 * invstd * invstd * sum_dy_xmu / count
                b = -k1 * sum_dy / count - mean * a
                shape = (1, -1, 1, 1)
                grad_x = torch.addcmul(b.view(shape), y, a.view(shape))
                grad_x.addcmul_(g, k1.view(shape))
                grad_x = grad_x.to(y.dtype)
        return (grad_x, grad_w if need_w else None, grad_b if need_b else None,
                None, None, None, None)
