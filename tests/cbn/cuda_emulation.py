"""CPU emulations of PyTorch's fused batch-norm CUDA kernels, so that CI runs the layer's CUDA
branch (``kernels.FUSED``) without a GPU.

This is an emulation, not the GPU. Each kernel follows what torch's CUDA implementation does
(``aten/src/ATen/native/cuda/Normalization.cu`` / ``Normalization.cuh`` and the schemas in
``native_functions.yaml``): the formulas, the accumulation dtype of the outputs, the reshape to
``[N, C, -1]`` that rejects empty inputs (PyTorch issue #36530), the int32 ``count`` whose SUM is
the divisor, the memory format of the outputs, and the dtype checks that raise. Arithmetic runs
in the accumulation dtype (float32 for fp16/bf16/fp32 inputs, float64 for float64), as on the
GPU, except the moments: Welford's update is exact for a constant channel (mean = the value,
variance 0), which a float64 corrected two-pass reproduces; summation orders differ.

``emulated_cuda_kernels()`` registers them as the CPU kernels of those ATen ops and makes
``cbn_mmdet.cbn.kernels.select`` pick the fused set for CPU tensors; leaving it restores both.
Where a kernel has two code paths with different dtype rules (contiguous vs channels-last), the
stricter one is emulated for both.
"""
import contextlib
import warnings

import torch

from cbn_mmdet.cbn import kernels

CALLS = []  # (op name, memory format of the activation arguments) while recording


def _acc(dtype):
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise RuntimeError(f'"batch_norm_cuda" not implemented for \'{dtype}\'')
    return torch.float64 if dtype == torch.float64 else torch.float32


def _expect(t, dtype, what):
    """The packed-accessor check: a tensor read as ``dtype`` must have that dtype."""
    if t is not None and t.dtype != dtype:
        raise RuntimeError(f'expected scalar type {_name(dtype)} but found {_name(t.dtype)} ({what})')


def _name(dtype):
    return {torch.float16: 'Half', torch.bfloat16: 'BFloat16', torch.float32: 'Float',
            torch.float64: 'Double', torch.int32: 'Int', torch.int64: 'Long'}.get(dtype, str(dtype))


def _packed(x):
    """The kernels' ``reshape({N, C, -1})``: fails for 0 elements, as on the GPU."""
    return x.reshape(x.shape[0], x.shape[1], -1)


def _fmt(t):
    return kernels.memory_format(t)


def _ch(v):
    return v.view(1, -1, 1)


def _record(op, *tensors):
    CALLS.append((op, tuple(_fmt(t) for t in tensors)))


def update_stats(x, running_mean, running_var, momentum):
    """``batch_norm_update_stats``: mean and biased variance in the accumulation dtype."""
    acc = _acc(x.dtype)
    _record('batch_norm_update_stats', x)
    xr = _packed(x).to(torch.float64)
    mean = xr.mean((0, 2))
    mean = mean + (xr - _ch(mean)).mean((0, 2))  # corrected two-pass: a constant channel gives
    var = (xr - _ch(mean)).square().mean((0, 2))  # its value and variance 0 exactly, as Welford
    mean, var = mean.to(acc), var.to(acc)
    if running_mean is not None:
        n = xr.shape[0] * xr.shape[2]
        running_mean.copy_(momentum * mean + (1 - momentum) * running_mean)
        running_var.copy_(momentum * var * n / (n - 1) + (1 - momentum) * running_var)
    return mean, var


def stats(x, eps):
    """``batch_norm_stats``: mean and ``invstd`` (0 where the variance and eps are both 0)."""
    mean, var = update_stats(x, None, None, 0.0)
    invstd = torch.where((var != 0) | (eps != 0), (var + eps).rsqrt(), torch.zeros_like(var))
    return mean, invstd


def elemt(x, weight, bias, mean, invstd, eps):
    """``batch_norm_elemt``: ``((x - mean) * invstd) * weight + bias`` (eps unused)."""
    acc = _acc(x.dtype)
    params = [t for t in (weight, bias) if t is not None]
    stat = x.dtype if not params or params[0].dtype == x.dtype else acc
    _expect(weight, stat, 'weight')
    _expect(bias, stat, 'bias')
    _expect(mean, acc, 'mean')
    _expect(invstd, acc, 'invstd')
    _record('batch_norm_elemt', x)
    xr = _packed(x).to(acc)
    out = (xr - _ch(mean)) * _ch(invstd)
    if weight is not None:
        out = out * _ch(weight.to(acc))
    if bias is not None:
        out = out + _ch(bias.to(acc))
    return out.view(x.shape).to(x.dtype).contiguous(memory_format=_fmt(x))


def backward_reduce(g, x, mean, invstd, weight, input_g, weight_g, bias_g):
    """``batch_norm_backward_reduce``: (sum g, sum g (x - mean), grad_weight, grad_bias)."""
    if mean.dtype != invstd.dtype:
        raise RuntimeError('mean and invstd need to have the same data types')
    acc = _acc(x.dtype)
    stat = acc if weight is not None and weight.dtype != x.dtype else x.dtype
    _expect(weight, stat, 'weight')
    _expect(mean, acc, 'mean')
    _expect(g, x.dtype, 'grad_output')
    if (weight_g or bias_g) and weight is None:
        raise RuntimeError('weight must be defined for weight or bias gradients')
    _record('batch_norm_backward_reduce', g, x)
    gr, xr = _packed(g).to(acc), _packed(x).to(acc)
    sum_dy = gr.sum((0, 2))
    sum_dy_xmu = (gr * (xr - _ch(mean))).sum((0, 2))
    return (sum_dy.to(mean.dtype) if input_g else None,
            sum_dy_xmu.to(mean.dtype) if input_g else None,
            (sum_dy_xmu * invstd).to(weight.dtype) if weight_g else None,
            sum_dy.to(weight.dtype) if bias_g else None)


def backward_elemt(g, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count):
    """``batch_norm_backward_elemt``: BN's input gradient over ``sum(count)`` elements."""
    if mean.dtype != invstd.dtype:
        raise RuntimeError('mean and invstd need to have the same data types')
    acc = _acc(x.dtype)
    low = x.dtype in (torch.float16, torch.bfloat16) and mean.dtype == torch.float32
    stat = acc if low else x.dtype
    _expect(weight, stat, 'weight')
    _expect(mean, _acc(stat), 'mean')
    _expect(sum_dy, _acc(stat), 'sum_dy')
    _expect(sum_dy_xmu, _acc(stat), 'sum_dy_xmu')
    _expect(g, x.dtype, 'grad_output')
    _expect(count, torch.int32, 'count')
    _record('batch_norm_backward_elemt', g, x)
    div = int(count.to(torch.int64).sum())
    gr, xr = _packed(g).to(acc), _packed(x).to(acc)
    factor_1 = invstd * invstd * sum_dy_xmu / div
    factor_2 = invstd if weight is None else weight.to(acc) * invstd
    out = (gr - _ch(sum_dy / div) - (xr - _ch(mean)) * _ch(factor_1)) * _ch(factor_2)
    cl = kernels.memory_format(g) == torch.channels_last
    return out.view(x.shape).to(x.dtype).contiguous(
        memory_format=torch.channels_last if cl else torch.contiguous_format)


KERNELS = {
    'batch_norm_update_stats': update_stats,
    'batch_norm_stats': stats,
    'batch_norm_elemt': elemt,
    'batch_norm_backward_reduce': backward_reduce,
    'batch_norm_backward_elemt': backward_elemt,
}


@contextlib.contextmanager
def emulated_cuda_kernels(select_fused=True):
    """Register the emulations as CPU kernels (and pick ``kernels.FUSED`` for CPU tensors)."""
    lib = torch.library.Library('aten', 'IMPL')
    original = kernels.select
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # batch_norm_update_stats has a CPU kernel: overridden
            for op, fn in KERNELS.items():
                lib.impl(op, fn, 'CPU')
        if select_fused:
            kernels.select = lambda t: kernels.FUSED
        yield
    finally:
        kernels.select = original
        _unregister(lib)


def _unregister(lib) -> None:
    """Remove the library's kernels: ``Library._destroy`` (torch >= 2.4); before that, drop the
    C++ library object (its destructor deregisters them) and torch.library's record of them."""
    if hasattr(lib, '_destroy'):
        lib._destroy()
        return
    lib.m = None
    torch.library._impls.difference_update(lib._op_impls)
