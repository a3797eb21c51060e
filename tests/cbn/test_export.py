"""Export and analysis tools on an eval-mode CBN model, each compared with its eager eval output.

Each model is first trained a few steps (the window is used and compensated, running statistics
and counters move), then put in eval mode. Two models: 'layer', conv-CBN blocks in plain torch
(runs without mmcv), and 'resnet_fpn', mmdet's ResNet-18 with ``norm_cfg=dict(type='CBN')`` and
an FPN. Every test checks that the tool really ran (graph nodes, ONNX Runtime outputs, fused
modules, call counts) and that its result equals the eager one.
"""
import copy
import inspect
import warnings

import pytest
import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from cbn_mmdet.cbn import CrossIterationBatchNorm2d

TORCH = tuple(int(v) for v in torch.__version__.split('+')[0].split('.')[:2])
SIZE = 64  # eval input
TRAIN_SIZE, STEPS = 32, 3  # training before eval: the window holds 2 stored iterations
KINDS = ['layer', 'resnet_fpn']
N_LAYERS = {'layer': 2, 'resnet_fpn': 20}  # ResNet-18: stem 1, blocks 16, downsamples 3
CBN_CFG = dict(type='CBN', window=3, burnin=0, requires_grad=True)
ATOL, RTOL = 1e-5, 1e-4  # fused or re-implemented conv arithmetic (fp32)


def _cbn_layers(model):
    return [m for m in model.modules() if isinstance(m, CrossIterationBatchNorm2d)]


def _outs(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _assert_outputs_equal(got, ref, rtol=RTOL, atol=ATOL):
    got = _outs(got)
    assert len(got) == len(ref)
    for g, r in zip(got, ref):
        g = torch.as_tensor(g)
        assert g.shape == r.shape
        torch.testing.assert_close(g, r, rtol=rtol, atol=atol)


def _layer_model():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1),
                         CrossIterationBatchNorm2d(8, window=3, burnin=0), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1),
                         CrossIterationBatchNorm2d(16, window=3, burnin=0))


class ResNetFPN(nn.Module):
    def __init__(self, norm_cfg):
        super().__init__()
        from mmdet.models.backbones import ResNet
        from mmdet.models.necks import FPN
        self.backbone = ResNet(depth=18, norm_cfg=norm_cfg, norm_eval=False, init_cfg=None)
        self.neck = FPN([64, 128, 256, 512], 32, num_outs=5)

    def forward(self, x):
        return tuple(self.neck(self.backbone(x)))


def _build(kind):
    if kind == 'layer':
        return _layer_model()
    pytest.importorskip('mmdet.models', reason='needs mmdet with mmcv built for this torch')
    import cbn_mmdet  # noqa: F401  (registers CBN)
    from mmengine.registry import init_default_scope
    init_default_scope('mmdet')
    return ResNetFPN(CBN_CFG)


def _train(model, steps=STEPS):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    for _ in range(steps):
        x = torch.randn(2, 3, TRAIN_SIZE, TRAIN_SIZE)
        loss = sum(o.square().mean() for o in _outs(model(x)))
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # a bounded step: no divergence
        opt.step()


@pytest.fixture(scope='module', params=KINDS)
def trained(request):
    """(kind, eval-mode model, input, eager eval outputs)."""
    torch.manual_seed(0)
    model = _build(request.param)
    _train(model)
    model.eval()
    layers = _cbn_layers(model)
    assert len(layers) == N_LAYERS[request.param]
    for m in layers:  # the window was used and the running statistics moved
        assert int(m.cbn_step) == STEPS and int(m.num_batches_tracked) == STEPS
        assert m.window_state()['cbn_valid'].any()
        assert not torch.allclose(m.running_var, torch.ones_like(m.running_var))
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        ref = [o.detach() for o in _outs(model(x))]
        assert all(torch.isfinite(r).all() for r in ref)
        # the running statistics matter: with BN's initial ones the output is far from ref
        fresh = copy.deepcopy(model)
        for m in _cbn_layers(fresh):
            m.reset_running_stats()
        assert max((a - b).abs().max().item() for a, b in zip(_outs(fresh(x)), ref)) > 1e-2
    return request.param, model, x, ref


# ------------------------------------------------------------------ torch.fx
def test_fx_symbolic_trace(trained):
    """Each CBN layer is one call_module node, as fx records nn.BatchNorm2d: the GraphModule runs
    the real layer, in eval mode equal to eager, and in training mode it still trains as CBN
    (nothing of either mode is baked into the graph)."""
    kind, model, x, ref = trained
    model = copy.deepcopy(model)
    gm = torch.fx.symbolic_trace(model)
    modules = dict(gm.named_modules())
    nodes = [n for n in gm.graph.nodes if n.op == 'call_module'
             and isinstance(modules[n.target], CrossIterationBatchNorm2d)]
    assert len(nodes) == N_LAYERS[kind]
    assert {id(modules[n.target]) for n in nodes} == {id(m) for m in _cbn_layers(model)}
    with torch.no_grad():
        _assert_outputs_equal(gm(x), ref, rtol=0, atol=0)

    # training through the GraphModule is the eager model's training (same layers, same steps)
    eager = copy.deepcopy(model)
    for net in (gm, eager):
        torch.manual_seed(1)
        _train(net, steps=1)
    for a, b in zip(_cbn_layers(model), _cbn_layers(eager)):
        assert int(a.cbn_step) == int(b.cbn_step) == STEPS + 1
        torch.testing.assert_close(a.running_mean, b.running_mean, rtol=1e-5, atol=1e-6)


def test_fx_graph_module_keeps_the_input_rank_check():
    layer = CrossIterationBatchNorm2d(3).eval()
    gm = torch.fx.symbolic_trace(nn.Sequential(layer))
    with pytest.raises(ValueError, match='4-d'):
        gm(torch.randn(2, 3, 4))


def test_sync_cbn_in_eval_traces_as_cbn():
    """SyncCBN (distributed training only) in eval mode: the same module call under fx and one
    batch_norm under jit.trace, both equal to eager."""
    from cbn_mmdet.cbn import SyncCrossIterationBatchNorm2d
    layer = SyncCrossIterationBatchNorm2d(8)
    layer.running_mean.uniform_(-1, 1)
    layer.running_var.uniform_(0.5, 2)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), layer).eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
        gm = torch.fx.symbolic_trace(model)
        assert [n.target for n in gm.graph.nodes if n.op == 'call_module'] == ['0', '1']
        torch.testing.assert_close(gm(x), ref, rtol=0, atol=0)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            traced = torch.jit.trace(model, x)
        assert [n.kind() for n in traced.inlined_graph.nodes()].count('aten::batch_norm') == 1
        torch.testing.assert_close(traced(x), ref, rtol=0, atol=1e-6)


# ------------------------------------------------------------------ torch.jit.trace
def test_jit_trace(trained):
    kind, model, x, ref = trained
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # deprecation (new torch), TracerWarnings of the FPN
        traced = torch.jit.trace(model, x)
    kinds = [n.kind() for n in traced.inlined_graph.nodes()]
    assert kinds.count('aten::batch_norm') == N_LAYERS[kind]
    with torch.no_grad():
        _assert_outputs_equal(traced(x), ref, rtol=0, atol=1e-6)
        x2 = torch.randn_like(x)
        _assert_outputs_equal(traced(x2), _outs(model(x2)), rtol=0, atol=1e-6)


# ------------------------------------------------------------------ torch.export
def test_torch_export(trained):
    kind, model, x, ref = trained
    if not hasattr(torch, 'export') or not hasattr(torch.export, 'export'):
        pytest.skip(f'torch {torch.__version__} has no torch.export.export')
    ep = torch.export.export(model, (x,))
    bn = [n for n in ep.graph.nodes if n.op == 'call_function' and 'batch_norm' in str(n.target)]
    assert len(bn) == N_LAYERS[kind]
    run = ep.module() if hasattr(ep, 'module') else ep
    with torch.no_grad():
        _assert_outputs_equal(run(x), ref, rtol=0, atol=1e-6)


# ------------------------------------------------------------------ ONNX
def _run_onnx(path, x, ref):
    onnx = pytest.importorskip('onnx')
    ort = pytest.importorskip('onnxruntime')
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    ops = [n.op_type for n in proto.graph.node]
    assert 'Conv' in ops
    sess = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    (inp,) = sess.get_inputs()
    outs = sess.run(None, {inp.name: x.numpy()})
    assert len(outs) == len(ref)
    _assert_outputs_equal([torch.from_numpy(o) for o in outs], ref)
    return ops


def _export_kwargs():
    return set(inspect.signature(torch.onnx.export).parameters)


def test_onnx_torchscript_exporter(trained, tmp_path):
    kind, model, x, ref = trained
    pytest.importorskip('onnx')
    pytest.importorskip('onnxruntime')
    kwargs = {'dynamo': False} if 'dynamo' in _export_kwargs() else {}
    path = tmp_path / 'model.onnx'
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # deprecation of the TorchScript exporter (new torch)
        torch.onnx.export(model, (x,), str(path), input_names=['x'], opset_version=17, **kwargs)
    _run_onnx(path, x, ref)


def test_onnx_dynamo_exporter(trained, tmp_path):
    kind, model, x, ref = trained
    if 'dynamo' not in _export_kwargs():
        pytest.skip(f'torch.onnx.export of torch {torch.__version__} has no dynamo= (torch >= 2.5)')
    pytest.importorskip('onnx')
    pytest.importorskip('onnxruntime')
    pytest.importorskip('onnxscript', reason='the dynamo ONNX exporter needs onnxscript')
    path = tmp_path / 'model.onnx'
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        torch.onnx.export(model, (x,), str(path), dynamo=True)
    _run_onnx(path, x, ref)


# ------------------------------------------------------------------ mmcv / mmengine
def test_mmcv_fuse_conv_bn(trained):
    kind, model, x, ref = trained
    pytest.importorskip('mmcv.cnn', reason='needs mmcv built for this torch')
    from mmcv.cnn import fuse_conv_bn
    model = copy.deepcopy(model)
    convs_before = {n: m.weight.detach().clone() for n, m in model.named_modules()
                    if isinstance(m, nn.Conv2d)}
    fused = fuse_conv_bn(model)
    assert not [m for m in fused.modules() if isinstance(m, _BatchNorm)]
    assert sum(isinstance(m, nn.Identity) for m in fused.modules()) == N_LAYERS[kind]
    convs_after = {n: m for n, m in fused.named_modules() if isinstance(m, nn.Conv2d)}
    changed = [n for n, w in convs_before.items() if not torch.equal(convs_after[n].weight, w)]
    assert len(changed) == N_LAYERS[kind]  # every conv followed by a CBN got its statistics
    with torch.no_grad():
        _assert_outputs_equal(fused(x), ref)


def _count_calls(module, counter):
    return module.register_forward_hook(lambda *_: counter.__setitem__(0, counter[0] + 1))


def test_mmcv_conv_module_efficient_conv_bn_eval():
    """ConvModule(norm_cfg=CBN, efficient_conv_bn_eval=True): training runs the CBN layers, eval
    folds their running statistics into the conv (the layer itself is not called) with the
    output of the plain eval forward."""
    pytest.importorskip('mmcv.cnn', reason='needs mmcv built for this torch')
    import cbn_mmdet  # noqa: F401
    from mmcv.cnn import ConvModule
    torch.manual_seed(0)
    model = nn.Sequential(
        ConvModule(3, 8, 3, padding=1, norm_cfg=CBN_CFG, efficient_conv_bn_eval=True),
        ConvModule(8, 16, 3, stride=2, padding=1, norm_cfg=CBN_CFG, efficient_conv_bn_eval=True))
    assert all(m.efficient_conv_bn_eval_forward is not None for m in model)
    _train(model)
    assert all(int(m.norm.cbn_step) == STEPS for m in model)  # training ran the CBN layers
    plain = copy.deepcopy(model).eval()
    for m in plain:
        m.turn_on_efficient_conv_bn_eval(False)
    model.eval()
    calls, norm_calls = [0], [0]
    for m in model:
        inner = m.efficient_conv_bn_eval_forward

        def counted(bn, conv, x, inner=inner):
            calls[0] += 1
            return inner(bn, conv, x)
        m.efficient_conv_bn_eval_forward = counted
        _count_calls(m.norm, norm_calls)
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        out, ref = model(x), plain(x)
    assert calls[0] == 2 and norm_calls[0] == 0
    torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)


def test_mmengine_efficient_conv_bn_eval(trained):
    """mmengine's Runner option ``efficient_conv_bn_eval=['backbone']``
    (turn_on_efficient_conv_bn_eval, done at the start of training on the train-mode model;
    'layer': the whole model): its fx pass finds every conv-CBN pair; eval runs the folded conv,
    training still runs CBN."""
    kind, model, x, ref = trained
    import mmengine.model.efficient_conv_bn_eval as ecbe
    model = copy.deepcopy(model).train()
    if kind == 'resnet_fpn':
        ecbe.turn_on_efficient_conv_bn_eval(model, ['backbone'])  # what the Runner calls
    else:
        ecbe.turn_on_efficient_conv_bn_eval_for_single_model(model)
    calls, cbn_calls = [0], [0]
    inner = ecbe.efficient_conv_bn_eval_forward

    def counted(bn, conv, x):
        calls[0] += 1
        return inner(bn, conv, x)
    for m in _cbn_layers(model):
        _count_calls(m, cbn_calls)
    mp = pytest.MonkeyPatch()
    mp.setattr(ecbe, 'efficient_conv_bn_eval_forward', counted)
    try:
        model.eval()
        with torch.no_grad():
            out = model(x)
        assert calls[0] == N_LAYERS[kind] and cbn_calls[0] == 0
        _assert_outputs_equal(out, ref)
        calls[0] = 0
        _train(model, steps=1)  # training mode: the CBN layers run, nothing is folded
        assert calls[0] == 0 and cbn_calls[0] == N_LAYERS[kind]
        assert all(int(m.cbn_step) == STEPS + 1 for m in _cbn_layers(model))
    finally:
        mp.undo()


# ------------------------------------------------------------------ FLOPs (mmengine.analysis)
def _detector(config):
    import os

    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    import cbn_mmdet  # noqa: F401
    from mmdet.registry import MODELS
    init_default_scope('mmdet')
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cfg = Config.fromfile(os.path.join(root, 'configs', 'cbn', config))
    cfg.model.backbone.update(depth=18, init_cfg=None)
    cfg.model.neck.in_channels = [64, 128, 256, 512]
    cfg.model.test_cfg.rpn.update(nms_pre=64, max_per_img=8)  # 8 RoIs: a fast box head
    torch.manual_seed(0)
    return MODELS.build(cfg.model).eval()


class _TensorForward(nn.Module):
    """The detector's tensor forward with fixed data samples (as mmdet's get_flops.py does)."""

    def __init__(self, det, samples):
        super().__init__()
        self.det, self.samples = det, samples

    def forward(self, x):
        return self.det._forward(x, self.samples)


def test_flops_of_cbn_detector_equal_bn_detector():
    pytest.importorskip('mmdet.models', reason='needs mmdet with mmcv built for this torch')
    from mmengine.analysis import FlopAnalyzer, get_model_complexity_info
    from mmdet.structures import DetDataSample
    cbn = _detector('faster-rcnn_r50_fpn_cbn_4xb4-1x_coco.py')
    bn = _detector('faster-rcnn_r50_fpn_bn_4xb4-1x_coco.py')
    n_cbn = len(_cbn_layers(cbn))
    assert n_cbn == 8 + 4 and not _cbn_layers(bn)  # FPN 4 + 4 and the 4 box-head convs
    missing, unexpected = bn.load_state_dict(cbn.state_dict(), strict=False)
    assert not missing and {k.rsplit('.', 1)[1] for k in unexpected} == {'cbn_step', 'cbn_skipped'}
    meta = dict(img_shape=(SIZE, SIZE), ori_shape=(SIZE, SIZE), pad_shape=(SIZE, SIZE),
                scale_factor=(1.0, 1.0), batch_input_shape=(SIZE, SIZE))
    samples = [DetDataSample(metainfo=meta)]
    x = torch.randn(1, 3, SIZE, SIZE)
    results = {}
    for name, det in (('cbn', cbn), ('bn', bn)):
        net = _TensorForward(det, samples).eval()
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            flops = FlopAnalyzer(net, (x,)).unsupported_ops_warnings(False)
            results[name] = flops.total(), flops.by_module()
    assert results['cbn'][0] == results['bn'][0] > 0
    with warnings.catch_warnings():  # the entry point of mmdet's tools/analysis_tools/get_flops.py
        warnings.simplefilter('ignore')
        info = get_model_complexity_info(_TensorForward(cbn, samples), inputs=(x,),
                                         show_table=False, show_arch=False)
    assert info['flops'] == results['cbn'][0]
    norms = [n for n, m in cbn.named_modules() if isinstance(m, CrossIterationBatchNorm2d)]
    for n in norms:  # each CBN layer counted, as its BN counterpart
        assert results['cbn'][1][f'det.{n}'] == results['bn'][1][f'det.{n}'] > 0
    assert results['cbn'][1] == results['bn'][1]
