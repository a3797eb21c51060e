"""torch.compile over CBN models: compensation kept, graphs really compiled, eval fullgraph."""
import copy
import logging
import warnings

import pytest
import torch
import torch.nn as nn

from torch._dynamo.testing import CompileCounterWithBackend

from cbn_mmdet.cbn import CrossIterationBatchNorm2d, keep_producing_convs_eager


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.integration
def test_compiled_model_with_many_cbn_layers_matches_eager_without_recompile_storm():
    """12 CBN layers of different widths: the layer is one clean graph break (its training
    forward runs eagerly), compiled training matches eager, and no frame of the model other
    than the layer's own mode switch hits dynamo's recompile limit (after which dynamo would
    run that frame eagerly)."""
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
    # The limit is per code object: the layer's own small forward (mode switch, then the eager
    # training forward) may be compiled once per layer when dynamo skips the Sequential's
    # frame, as BatchNorm2d's would be; no other frame of the model may hit the limit.
    hits = [m for m in records.messages if 'recompile_limit' in m or 'cache_size_limit' in m]
    assert not [m for m in hits if "function: 'forward' (" not in m
                or 'cbn_mmdet/cbn/layer.py' not in m], hits
    for a, b in zip(model.state_dict().values(), eager.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


class _Block(nn.Module):
    """Straight-line ``conv -> CBN`` code as in mmdet's ResNet blocks and mmcv's ConvModule:
    dynamo traces this frame (an ``nn.Sequential``'s loop would make it skip the frame)."""

    def __init__(self, c_in=3, c=8, window=3, compensate=True):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c, 3, padding=1, bias=False)
        self.bn1 = CrossIterationBatchNorm2d(c, window=window, burnin=1, compensate=compensate)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = CrossIterationBatchNorm2d(c, window=window, burnin=1, compensate=compensate)

    def forward(self, x):
        out = self.conv1(x)
        out = self.bn1(out)
        out = torch.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        return torch.relu(out) * 2 + out.mean()


def _train(net, xs, lr=0.2):
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    outs = []
    for x in xs:
        out = net(x)
        opt.zero_grad()
        out.square().mean().backward()
        opt.step()
        outs.append(out.detach())
    return outs


def _ours(records):
    return [str(w.message) for w in records if 'compensation' in str(w.message)
            or 'torch.compile' in str(w.message)]


@pytest.mark.parametrize('backend', ['aot_eager', pytest.param('inductor', marks=pytest.mark.integration)])
def test_compiled_straight_line_code_keeps_the_compensation(backend):
    """torch.compile over straight-line conv -> CBN code, after ``keep_producing_convs_eager``:
    7 SGD steps equal the eager run (1e-5), with no fallback warning, dynamo compiled graphs
    (its counters), and the result is not plain averaging (the compensation ran)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = _Block()
    model, plain = copy.deepcopy(eager), _Block(compensate=False)
    plain.load_state_dict(eager.state_dict())
    assert keep_producing_convs_eager(model) == ['conv1', 'conv2']
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(model, backend=counter)
    xs = [torch.randn(2, 3, 8, 8) + 0.5 for _ in range(7)]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter('always')
        got = _train(compiled, xs)
    ref, avg = _train(eager, xs), _train(plain, xs)
    assert _ours(rec) == []
    assert counter.frame_count > 0 and counter.op_count > 0  # dynamo compiled, did not skip
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for (k, a), b in zip(model.state_dict().items(), eager.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=k)
    assert (got[-1] - avg[-1]).abs().max() > 1e-3  # not plain averaging
    assert model.bn2.cbn_deriv.abs().sum() > 0


def test_compiled_conv_without_eager_convs_warns_how_to_keep_the_compensation():
    """Without ``keep_producing_convs_eager`` dynamo compiles the conv; the layer cannot see it
    and says so once, naming torch.compile and the fix."""
    torch._dynamo.reset()
    model = _Block()
    counter = CompileCounterWithBackend('aot_eager')
    compiled = torch.compile(model, backend=counter)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter('always')
        _train(compiled, [torch.randn(2, 3, 8, 8) for _ in range(3)])
    msgs = _ours(rec)
    assert counter.frame_count > 0
    assert len(msgs) == 2 and all('keep_producing_convs_eager' in m for m in msgs), msgs


def test_eval_mode_compiles_as_one_graph():
    """Eval-mode CBN is BatchNorm2d: ``fullgraph=True`` compiles the whole block, eager convs
    included (their eager forward is for training only), with the eager outputs."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _Block()
    _train(model, [torch.randn(2, 3, 8, 8) for _ in range(3)])
    keep_producing_convs_eager(model)
    model.eval()
    counter = CompileCounterWithBackend('aot_eager')
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-6, atol=1e-6)
    assert counter.frame_count == 1 and counter.op_count > 5
