"""Converters between CBN and BatchNorm2d keep parameters, statistics and eval outputs."""
import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from cbn_mmdet.cbn import CrossIterationBatchNorm2d, convert_bn_to_cbn, convert_cbn_to_bn


def _bn_model():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Sequential(nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4, momentum=None)))


def _train(model, steps=4):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(2, 3, 9, 9)).square().mean().backward()
        opt.step()


def test_round_trip_keeps_eval_outputs_and_options():
    model = _bn_model()
    _train(model)
    x = torch.randn(3, 3, 9, 9)
    model.eval()
    expected = model(x)

    cbn = convert_bn_to_cbn(model, window=3, burnin=5, compensate=False)
    layers = [m for m in cbn.modules() if isinstance(m, CrossIterationBatchNorm2d)]
    assert len(layers) == 2 and all(isinstance(m, _BatchNorm) for m in layers)
    assert all(m.window == 3 and m.burnin == 5 and not m.compensate for m in layers)
    assert layers[1].momentum is None and not layers[0].training
    torch.testing.assert_close(cbn(x), expected, rtol=0, atol=0)

    cbn.train()
    _train(cbn)  # fills windows; then back to BN
    cbn.eval()
    expected = cbn(x)
    bn = convert_cbn_to_bn(cbn)
    assert not any(isinstance(m, CrossIterationBatchNorm2d) for m in bn.modules())
    assert sum(type(m) is nn.BatchNorm2d for m in bn.modules()) == 2
    torch.testing.assert_close(bn(x), expected, rtol=0, atol=0)


def test_convert_top_level_module_and_frozen_params():
    bn = nn.BatchNorm2d(4).requires_grad_(False)
    cbn = convert_bn_to_cbn(bn)
    assert isinstance(cbn, CrossIterationBatchNorm2d) and not cbn.weight.requires_grad
    back = convert_cbn_to_bn(cbn)
    assert type(back) is nn.BatchNorm2d and not back.weight.requires_grad
