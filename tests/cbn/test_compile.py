"""torch.compile (mmengine's ``compile=True``) over a model with many CBN layers."""
import copy
import logging

import pytest
import torch
import torch.nn as nn

from cbn_mmdet.cbn import CrossIterationBatchNorm2d


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.integration
def test_compiled_model_with_many_cbn_layers_matches_eager_without_recompile_storm():
    """12 CBN layers of different widths: the layer is one clean graph break (its training
    forward runs eagerly), so dynamo neither recompiles per layer shape nor hits its recompile
    limit (after which it would silently run the rest of the model eagerly)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layers, c = [], 3
    for co in [8, 12, 16, 8, 20, 12, 24, 16, 8, 12, 10, 6]:
        layers += [nn.Conv2d(c, co, 3, padding=1), CrossIterationBatchNorm2d(co, window=3), nn.ReLU()]
        c = co
    eager = nn.Sequential(*layers)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (eager, model)]
    records = _Records()
    logger = logging.getLogger('torch._dynamo')
    logger.addHandler(records)
    try:
        for step in range(5):
            x = torch.randn(2, 3, 8, 8)
            for net, opt in ((eager, opts[0]), (compiled, opts[1])):
                out = net(x)
                opt.zero_grad()
                out.square().mean().backward()
                opt.step()
                if net is eager:
                    ref = out.detach()
            torch.testing.assert_close(out.detach(), ref, rtol=1e-5, atol=1e-5)
        compiled.eval()
        x = torch.randn(2, 3, 8, 8)
        torch.testing.assert_close(compiled(x), eager.eval()(x), rtol=1e-5, atol=1e-5)
    finally:
        logger.removeHandler(records)
    assert not [m for m in records.messages if 'recompile_limit' in m or 'cache_size_limit' in m]
    for a, b in zip(model.state_dict().values(), eager.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
