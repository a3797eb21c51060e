"""The CUDA branch against the CPU float64 path over SGD steps.

Each check runs on a real GPU (``device='cuda'``, marked ``cuda``: skipped without one) and, in
CI, on CPU with the fused kernels emulated (``'cpu-emulated'``, see cuda_emulation.py): the
same test code, so a defect of the test itself shows here too. TF32 is off inside the matrix
(cuDNN uses it for float32 convolutions by default; it would test cuDNN, not CBN).
"""
import contextlib
import copy

import pytest
import torch
import torch.nn as nn

from cbn_mmdet.cbn import CrossIterationBatchNorm2d, compat, kernels
from tests.cbn.cuda_emulation import emulated_cuda_kernels
from tests.helpers import CPU_FP16_AUTOCAST, needs_cpu_fp16_autocast

DEVICES = [pytest.param('cuda', marks=pytest.mark.cuda), 'cpu-emulated']


@contextlib.contextmanager
def _on(device):
    """(torch device, context): the GPU with TF32 off, or CPU with the emulated kernels."""
    if device == 'cuda':
        flags = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield torch.device('cuda')
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags
    else:
        with emulated_cuda_kernels():
            yield torch.device('cpu')


@contextlib.contextmanager
def _reference():
    """The CPU reference side always runs the portable kernels: under the emulation every CPU
    tensor would otherwise take the fused set and the fused path would be compared with itself."""
    original = kernels.select
    kernels.select = lambda t: kernels.PORTABLE
    try:
        yield
    finally:
        kernels.select = original


def _pair(window=4, compensate=True):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    layer = CrossIterationBatchNorm2d(16, window=window, compensate=compensate)
    return conv, layer


def _batches(steps=8):
    """``steps`` fixed (input, target) pairs in float64 on the CPU."""
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        yield (torch.randn(2, 8, 12, 12, generator=g, dtype=torch.float64) + 0.5,
               torch.randn(2, 16, 12, 12, generator=g, dtype=torch.float64))


def _step(conv, layer, opt, x, target):
    xi = x.detach().clone().requires_grad_()  # a leaf of its own on every side
    out = layer(conv(xi))
    opt.zero_grad()
    ((out - target) ** 2).mean().backward()
    grads = [xi.grad, conv.weight.grad, layer.weight.grad, layer.bias.grad]
    opt.step()
    return out.detach(), [g.detach().double().cpu() for g in grads]


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('compensate', [True, False])
def test_cuda_matches_cpu_over_sgd_steps(device, dtype, compensate):
    conv, layer = _pair(compensate=compensate)
    cpu = (copy.deepcopy(conv).double(), copy.deepcopy(layer).double())
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-10)
    with _on(device) as dev:
        gpu = (copy.deepcopy(conv).to(dev, dtype), copy.deepcopy(layer).to(dev, dtype))
        opts = [torch.optim.SGD([*c.parameters(), *n.parameters()], lr=0.05, momentum=0.9)
                for c, n in (cpu, gpu)]
        for x, target in _batches():
            with _reference():
                out_c, grads_c = _step(*cpu, opts[0], x, target)
            out_g, grads_g = _step(*gpu, opts[1], x.to(dev, dtype), target.to(dev, dtype))
            torch.testing.assert_close(out_g.double().cpu(), out_c, **tol)
            for a, b in zip(grads_g, grads_c):
                torch.testing.assert_close(a, b, **tol)
    for k, v in cpu[1].state_dict().items():
        other = gpu[1].state_dict()[k]
        torch.testing.assert_close(other.cpu().to(v.dtype), v, **tol)


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_cuda_autocast_keeps_float32_statistics(device, dtype):
    conv, layer = _pair()
    with _on(device) as dev:
        if dev.type == 'cpu' and dtype == torch.float16 and not CPU_FP16_AUTOCAST:
            pytest.skip(needs_cpu_fp16_autocast.kwargs['reason'])
        conv, layer = conv.to(dev), layer.to(dev)
        ref_conv, ref_layer = copy.deepcopy(conv).double(), copy.deepcopy(layer).double()
        for _ in range(5):
            x = torch.randn(4, 8, 32, 32, device=dev)
            with torch.autocast(dev.type, dtype=dtype):
                out = layer(conv(x))
            assert out.dtype == dtype
            out.float().square().mean().backward()
            with _reference():
                ref = ref_layer(ref_conv(x.double()))
                ref.square().mean().backward()
            assert (out.double() - ref).abs().max() < (0.02 if dtype == torch.float16 else 0.1)
    assert layer.cbn_dnu.dtype == torch.float32 and torch.isfinite(layer.cbn_dnu).all()
    torch.testing.assert_close(layer.running_var.double(), ref_layer.running_var, rtol=0.02, atol=0.02)
    torch.testing.assert_close(layer.cbn_dnu.double(), ref_layer.cbn_dnu, rtol=0.02, atol=0.02)


@pytest.mark.cuda
def test_state_dict_moves_between_devices():
    conv, layer = _pair(window=3)
    for _ in range(3):
        layer(conv(torch.randn(2, 8, 6, 6))).sum().backward()
    gpu = copy.deepcopy(layer).cuda()
    assert gpu.cbn_dnu.is_cuda and gpu.cbn_head.is_cuda
    fresh = CrossIterationBatchNorm2d(16, window=3).cuda()
    fresh.load_state_dict(layer.state_dict())
    for k, v in layer.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[k].cpu(), v)


@pytest.mark.cuda
@pytest.mark.parametrize('compensate', [True, False])
def test_no_host_sync_in_training_steps_on_cuda(compensate):
    """Windowed training steps whose element count changes every step (as in the mask head) run
    under ``torch.cuda.set_sync_debug_mode('error')``: any host sync in CBN's forward, backward
    or the tables built for a new shape raises."""
    conv, layer = _pair(window=4, compensate=compensate)
    conv, layer = conv.cuda(), layer.cuda()
    layer.burnin = 0
    opt = torch.optim.SGD([*conv.parameters(), *layer.parameters()], lr=0.05, foreach=True)
    for n in (2, 3):  # the window's tensors are allocated in the first windowed steps
        out = layer(conv(torch.randn(n, 8, 10, 10, device='cuda')))
        out.square().mean().backward()
        opt.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        for n in (4, 5, 6, 7, 1):  # a new m = n * 10 * 10 at every step
            out = layer(conv(torch.randn(n, 8, 10, 10, device='cuda')))
            opt.zero_grad()
            out.square().mean().backward()
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert int(layer.cbn_valid.sum()) == 3


@contextlib.contextmanager
def _cublas_tf32(matmul):
    """cuBLAS float32 matmuls as torch's default leaves them, or TF32 set the way this torch
    recommends (per-backend ``fp32_precision`` where it has it, else the process-wide API)."""
    if matmul == 'default':
        yield
        return
    per_backend = compat._per_backend_api()
    saved = (torch.backends.cuda.matmul.fp32_precision if per_backend
             else torch.get_float32_matmul_precision())
    if per_backend:
        torch.backends.cuda.matmul.fp32_precision = 'tf32'
    else:
        torch.set_float32_matmul_precision('high')
    try:
        yield
    finally:
        if per_backend:
            torch.backends.cuda.matmul.fp32_precision = saved
        else:
            torch.set_float32_matmul_precision(saved)


@pytest.mark.cuda
@pytest.mark.parametrize('matmul', ['default', 'tf32'])
def test_default_tf32_settings_as_users_have_them(matmul):
    """The user's TF32 defaults left as they are (cuDNN: TF32 on for float32 convolutions, the
    conv feeding CBN and CBN's d nu/dW convolution included; cuBLAS: per torch's default, or TF32
    turned on for matmuls too): 8 SGD steps on the GPU stay within TF32's rounding of the CPU
    float64 run, and the compensation survives (the compensated model is closer to float64 CBN
    than plain averaging is)."""
    assert torch.backends.cudnn.allow_tf32, 'test needs the default cuDNN TF32 setting'
    with _cublas_tf32(matmul):
        _tf32_steps()


def _tf32_steps():
    conv, layer = _pair()
    plain = copy.deepcopy(layer)
    plain.compensate = False
    cpu = (copy.deepcopy(conv).double(), copy.deepcopy(layer).double())
    gpu = (copy.deepcopy(conv).cuda(), layer.cuda())
    gpu_plain = (copy.deepcopy(conv).cuda(), plain.cuda())
    sides = (cpu, gpu, gpu_plain)
    opts = [torch.optim.SGD([*c.parameters(), *n.parameters()], lr=0.1) for c, n in sides]
    for x, target in _batches():
        with _reference():
            out_c, _ = _step(*cpu, opts[0], x, target)
        out_g, _ = _step(*gpu, opts[1], x.cuda().float(), target.cuda().float())
        out_p, _ = _step(*gpu_plain, opts[2], x.cuda().float(), target.cuda().float())
        torch.testing.assert_close(out_g.double().cpu(), out_c, rtol=1e-2, atol=1e-2)
    err_cbn = (gpu[1].running_var.double().cpu() - cpu[1].running_var).abs().max()
    err_plain = (gpu_plain[1].running_var.double().cpu() - cpu[1].running_var).abs().max()
    assert err_cbn < 0.5 * err_plain, (err_cbn, err_plain)
