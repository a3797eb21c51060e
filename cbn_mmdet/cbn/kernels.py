"""The two kernel sets behind CBN's per-element work, chosen in one place: :func:`select`.

``FUSED`` calls PyTorch's fused batch-norm kernels the way ``nn.SyncBatchNorm`` does on CUDA
(one Welford pass for the moments, ``batch_norm_elemt`` for the output,
``batch_norm_backward_reduce`` / ``batch_norm_backward_elemt`` with an int32 element count).
``PORTABLE`` uses plain ATen ops that run anywhere (the CPU path). Both compute the same numbers.
The fused kernels have no CPU implementation; the tests run ``FUSED`` on CPU through emulations
of those kernels (``tests/cbn/cuda_emulation.py``).

Every method takes and returns statistics in the statistics dtype (float32, float64 for float64
inputs) and the activations in their own dtype and memory format. Empty inputs (0 elements) are
handled here: the CUDA kernels reject them (PyTorch issue #36530).
"""
from typing import Optional

import torch
from torch import Tensor

from . import compat

DIMS = (0, 2, 3)


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are kept in at least float32 (float64 inputs keep float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def memory_format(t: Tensor) -> torch.memory_format:
    """The memory format ``t`` is laid out in (ATen's ``suggest_memory_format``)."""
    if not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _as(t: Optional[Tensor], dtype) -> Optional[Tensor]:
    return None if t is None else t.to(dtype)


def _reduce_then_elemt(kern, g, y, weight, mean, invstd, count, all_reduce, need_x, need_w,
                       need_b):
    """SyncBN's backward: per-channel reductions (summed over processes by ``all_reduce``),
    then the elementwise input gradient over ``count`` elements."""
    sum_dy, sum_dy_xmu, gw, gb = kern.backward_reduce(g, y, mean, invstd, weight, need_x, need_w,
                                                      need_b)
    gx = None
    if need_x:
        if all_reduce is not None:
            sum_dy, sum_dy_xmu = all_reduce(sum_dy, sum_dy_xmu)
        gx = kern.backward_elemt(g, y, mean, invstd, weight, sum_dy, sum_dy_xmu, count)
    return gx, gw, gb


class PortableKernels:
    """Plain ATen ops; correct on any device, used on CPU."""

    name = 'portable'

    @staticmethod
    def moments(y: Tensor, out: Optional[Tensor] = None) -> Tensor:
        """(2, C): per-channel mean and mean of squares of a (N, C, H, W) tensor (into ``out``)."""
        c = y.shape[1]
        ys = y.to(stats_dtype(y.dtype))
        if out is None:
            out = ys.new_empty(2, c)
        if y.numel() == 0:
            return out.zero_()
        # On CPU two plain reductions beat var_mean's strided Welford reduction by ~10x.
        torch.mean(ys, DIMS, out=out[0])
        torch.mean(ys * ys, DIMS, out=out[1])
        return out


    @staticmethod
    def normalize(y, weight, bias, mean, invstd, var, eps):
        """``(y - mean) * invstd * weight + bias`` in ``y``'s dtype: BN's eval kernel."""
        dt = mean.dtype
        return torch.batch_norm(y, _as(weight, dt), _as(bias, dt), mean, var, False, 0.0, eps,
                                False)

    @staticmethod
    def backward_reduce(g, y, mean, invstd, weight, need_x, need_w, need_b):
        """``(sum g, sum g (y - mean), grad_weight, grad_bias)`` per channel."""
        if y.numel() == 0:
            z = mean.new_zeros(mean.shape)
            return z, z, z, z
        _, grad_w, sum_dy = torch.ops.aten.native_batch_norm_backward(
            g, y, None, None, None, mean, invstd, True, 0.0, [False, True, True])
        return sum_dy, grad_w / invstd, grad_w, sum_dy

    @classmethod
    def backward(cls, g, y, weight, mean, invstd, counts, all_reduce, need_x, need_w, need_b):
        """``(grad_y, grad_weight, grad_bias)``; ``counts = (1/n, n*m)`` as 0-d tensors."""
        inv_n, count = counts
        if all_reduce is not None or y.numel() == 0:
            return _reduce_then_elemt(cls, g, y, weight, mean, invstd, count, all_reduce,
                                      need_x, need_w, need_b)
        # BN's own backward over this batch (m elements) with weight w/n is 1/n of the gradient
        # over n*m elements, less the part (1 - 1/n) * w * invstd * g that the batch-mean terms
        # do not scale: one fused pass plus one addcmul.
        w = inv_n.expand(mean.shape) if weight is None else weight.to(mean.dtype) * inv_n
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
            g, y, w, None, None, mean, invstd, True, 0.0, [need_x, need_w, need_b])
        if need_x:
            rest = (1 - inv_n) * invstd if weight is None else (weight.to(mean.dtype) - w) * invstd
            compat.addcmul_into(gx, g, rest.view(1, -1, 1, 1))
        return gx, gw, gb

    @staticmethod
    def backward_elemt(g, y, mean, invstd, weight, sum_dy, sum_dy_xmu, count):
        """BatchNorm's input gradient with element count ``count`` in place of ``m``."""
        if y.numel() == 0:
            return torch.empty_like(y)
        k1 = invstd if weight is None else invstd * weight.to(invstd.dtype)
        # a * y + b + k1 * g with a = -k1 invstd^2 sum_dy_xmu / count, b = -k1 sum_dy / count - a mean
        coef = torch.stack((sum_dy, sum_dy_xmu * invstd * invstd)).mul_(k1 / -count)
        shape = (1, -1, 1, 1)
        b = torch.addcmul(coef[0], coef[1], mean, value=-1)
        grad = torch.addcmul(b.view(shape), y, coef[1].view(shape))
        return grad.addcmul_(g, k1.view(shape)).to(y.dtype)


    @staticmethod
    def counts(row: Tensor, int_counts, nvalid):
        """What :meth:`backward` needs of the pooled count: ``(1/n, n*m)`` (views of ``row``)."""
        return row[0], row[3]


class FusedKernels:
    """PyTorch's fused batch-norm CUDA kernels (as ``nn.SyncBatchNorm`` calls them)."""

    name = 'fused'

    @staticmethod
    def moments(y: Tensor, out: Optional[Tensor] = None) -> Tensor:
        """(2, C) mean and mean of squares from one Welford pass (``batch_norm_update_stats``:
        it returns the variance itself, exactly 0 for a constant channel)."""
        dt = stats_dtype(y.dtype)
        if out is None:
            out = torch.empty(2, y.shape[1], dtype=dt, device=y.device)
        if y.numel() == 0:
            return out.zero_()
        mean, var = torch.batch_norm_update_stats(y, None, None, 0.0)
        out[0].copy_(mean)
        torch.addcmul(var, mean, mean, out=out[1])
        return out


    @staticmethod
    def normalize(y, weight, bias, mean, invstd, var, eps):
        if y.numel() == 0:
            return torch.empty_like(y)
        dt = mean.dtype
        return torch.batch_norm_elemt(y, _as(weight, dt), _as(bias, dt), mean, invstd, eps)

    @staticmethod
    def backward_reduce(g, y, mean, invstd, weight, need_x, need_w, need_b):
        if y.numel() == 0:
            z = mean.new_zeros(mean.shape)
            return z, z, z, z
        return torch.batch_norm_backward_reduce(g, y, mean, invstd, _as(weight, mean.dtype),
                                                need_x, need_w and weight is not None,
                                                need_b and weight is not None)

    @staticmethod
    def counts(row: Tensor, int_counts, nvalid):
        """``(n*m,)`` as the (1,) int32 tensor ``batch_norm_backward_elemt`` reads."""
        if isinstance(nvalid, Tensor):
            return (int_counts.index_select(0, nvalid.view(1)),)
        return (int_counts[nvalid].view(1),)

    @classmethod
    def backward(cls, g, y, weight, mean, invstd, counts, all_reduce, need_x, need_w, need_b):
        """``(grad_y, grad_weight, grad_bias)``; ``counts = (n*m,)`` as an int32 tensor."""
        return _reduce_then_elemt(cls, g, y, weight, mean, invstd, counts[0], all_reduce,
                                  need_x, need_w, need_b)

    @staticmethod
    def backward_elemt(g, y, mean, invstd, weight, sum_dy, sum_dy_xmu, count):
        if y.numel() == 0:
            return torch.empty_like(y)
        # With fp16/bf16 activations and float32 statistics the kernel wants a float32 weight.
        return torch.batch_norm_backward_elemt(g, y, mean, invstd, _as(weight, mean.dtype),
                                               sum_dy, sum_dy_xmu, count)


PORTABLE = PortableKernels()
FUSED = FusedKernels()


def select(t: Tensor):
    """The kernel set for tensors on ``t``'s device: fused on CUDA, portable elsewhere."""
    return FUSED if t.is_cuda else PORTABLE

