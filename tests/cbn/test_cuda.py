"""CUDA paths (fused batch_norm_stats / elemt / backward kernels); skipped without a GPU."""
import copy

import pytest
import torch
import torch.nn as nn

from cbn_mmdet.cbn import CrossIterationBatchNorm2d

pytestmark = pytest.mark.cuda


def _pair(window=4, compensate=True):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    layer = CrossIterationBatchNorm2d(16, window=window, compensate=compensate)
    return conv, layer


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('compensate', [True, False])
def test_cuda_matches_cpu_over_sgd_steps(dtype, compensate):
    conv, layer = _pair(compensate=compensate)
    cpu = (conv.double(), layer.double())
    gpu = (copy.deepcopy(conv).to('cuda', dtype), copy.deepcopy(layer).to('cuda', dtype))
    opts = [torch.optim.SGD([*c.parameters(), *n.parameters()], lr=0.01, momentum=0.9)
            for c, n in (cpu, gpu)]
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-9)
    for _ in range(8):
        x = torch.randn(2, 8, 12, 12, dtype=torch.float64)
        outs, grads = [], []
        for (c, n), opt in zip((cpu, gpu), opts):
            xi = x.to(next(c.parameters())).requires_grad_()
            out = n(c(xi))
            opt.zero_grad()
            (out * torch.linspace(0, 1, 16, device=out.device, dtype=out.dtype).view(1, -1, 1, 1)
             ).square().sum().backward()
            outs.append(out.detach().double().cpu())
            grads.append([xi.grad.double().cpu(), c.weight.grad.double().cpu(),
                          n.weight.grad.double().cpu()])
            opt.step()
        torch.testing.assert_close(outs[1], outs[0], **tol)
        for a, b in zip(grads[1], grads[0]):
            torch.testing.assert_close(a, b, **tol)
    for k, v in cpu[1].state_dict().items():
        torch.testing.assert_close(gpu[1].state_dict()[k].double().cpu(), v.double(), **tol)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_cuda_autocast_keeps_float32_statistics(dtype):
    conv, layer = _pair()
    conv, layer = conv.cuda(), layer.cuda()
    ref_conv, ref_layer = copy.deepcopy(conv), copy.deepcopy(layer)
    for _ in range(5):
        x = torch.randn(4, 8, 32, 32, device='cuda')
        with torch.autocast('cuda', dtype=dtype):
            out = layer(conv(x))
        assert out.dtype == dtype
        out.float().square().mean().backward()
        ref_layer(ref_conv(x)).square().mean().backward()
    assert layer.cbn_dnu.dtype == torch.float32 and torch.isfinite(layer.cbn_dnu).all()
    torch.testing.assert_close(layer.running_var, ref_layer.running_var, rtol=0.02, atol=0.02)


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
