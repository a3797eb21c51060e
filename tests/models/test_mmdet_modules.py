"""CBN through mmcv's build_norm_layer in MMDetection's modules, and stock detectors training."""
import warnings

import pytest
import torch
from mmengine.hub import get_config
from mmengine.registry import init_default_scope
from torch.nn.modules.batchnorm import _BatchNorm

import cbn_mmdet  # noqa: F401
from cbn_mmdet.cbn import CrossIterationBatchNorm2d

CBN = dict(type='CBN', window=3, burnin=0, requires_grad=True)


@pytest.fixture(autouse=True, scope='module')
def _mmdet_scope():
    init_default_scope('mmdet')


def _layers(model):
    return [m for m in model.modules() if isinstance(m, CrossIterationBatchNorm2d)]


def _train_steps(model, make_loss, steps=3):
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter('error', UserWarning)  # any "not from a conv" warning fails
        for _ in range(steps):
            opt.zero_grad()
            make_loss().backward()
            opt.step()


def test_build_norm_layer_from_mmdet_scope():
    from mmcv.cnn import build_norm_layer
    name, layer = build_norm_layer(dict(type='CBN', window=2, burnin=5, compensate=False), 16, 3)
    assert name == 'bn3' and isinstance(layer, _BatchNorm)
    assert (layer.window, layer.burnin, layer.compensate) == (2, 5, False)
    with pytest.raises(ValueError, match='`window`'):
        build_norm_layer(dict(type='CBN', window=0), 16)
    # a typo in a config: ValueError naming it and the valid options (mmcv passes eps itself)
    for typ in ('CBN', 'SyncCBN'):
        with pytest.raises(ValueError, match=r"unknown option\(s\) \['windw'\]; valid options: .*window"):
            build_norm_layer(dict(type=typ, windw=4), 16)


@pytest.mark.parametrize('name,cls', [('CBN', 'CrossIterationBatchNorm2d'),
                                      ('CrossIterationBatchNorm2d', 'CrossIterationBatchNorm2d'),
                                      ('SyncCBN', 'SyncCrossIterationBatchNorm2d'),
                                      ('SyncCrossIterationBatchNorm2d',
                                       'SyncCrossIterationBatchNorm2d')])
def test_registered_under_short_and_class_names(name, cls):
    """Both layers are in MMEngine's MODELS under their short and class names (a config may
    name either), and build from it, through MODELS.build and through mmcv's build_norm_layer."""
    from mmcv.cnn import build_norm_layer
    from mmengine.registry import MODELS
    expected = getattr(cbn_mmdet, cls)
    assert MODELS.get(name) is expected
    layer = MODELS.build(dict(type=name, num_features=8, window=2))
    assert type(layer) is expected and layer.window == 2
    _, layer = build_norm_layer(dict(type=name, window=3), 8)
    assert type(layer) is expected and layer.window == 3


@pytest.mark.parametrize('depth', [18, 50])
def test_resnet_blocks_keep_bn_names_and_load_bn_checkpoints(depth):
    from mmdet.models.backbones import ResNet
    bn_net = ResNet(depth, norm_cfg=dict(type='BN'), base_channels=16)
    cbn_net = ResNet(depth, norm_cfg=dict(type='CBN', window=2, burnin=0), base_channels=16,
                     norm_eval=False)
    assert len(_layers(cbn_net)) == sum(isinstance(m, _BatchNorm) for m in bn_net.modules())
    result = cbn_net.load_state_dict(bn_net.state_dict(), strict=True)  # ImageNet-style keys
    assert not result.missing_keys and not result.unexpected_keys
    x = torch.randn(2, 3, 64, 64)
    _train_steps(cbn_net, lambda: sum(o.square().mean() for o in cbn_net(x)))
    assert all(m.cbn_dnu.dim() == 4 for m in _layers(cbn_net)), 'every layer found its conv'


def test_norm_eval_freezes_cbn_like_bn():
    from mmdet.models.backbones import ResNet
    net = ResNet(18, norm_cfg=dict(type='CBN'), norm_eval=True, base_channels=16)
    net.train()
    assert all(not m.training for m in _layers(net))


def test_norm_decay_mult_treats_cbn_as_norm():
    from mmengine.optim import build_optim_wrapper
    from mmdet.models.necks import FPN
    neck = FPN([16, 32], 16, 2, norm_cfg=CBN)
    wrapper = build_optim_wrapper(neck, dict(
        optimizer=dict(type='SGD', lr=0.1, weight_decay=1e-4),
        paramwise_cfg=dict(norm_decay_mult=0.0)))
    norm_params = {id(p) for m in _layers(neck) for p in m.parameters()}
    decays = {id(p): g['weight_decay'] for g in wrapper.optimizer.param_groups for p in g['params']}
    assert norm_params and all(decays[i] == 0.0 for i in norm_params)


def test_fpn_and_roi_heads_with_cbn_find_their_convs():
    from mmdet.models.necks import FPN
    from mmdet.models.roi_heads.bbox_heads import Shared4Conv1FCBBoxHead
    from mmdet.models.roi_heads.mask_heads import FCNMaskHead
    neck = FPN([8, 16, 32], 16, 4, norm_cfg=CBN)
    box = Shared4Conv1FCBBoxHead(in_channels=16, conv_out_channels=16, fc_out_channels=32,
                                 roi_feat_size=7, num_classes=3, norm_cfg=CBN)
    mask = FCNMaskHead(num_convs=2, in_channels=16, conv_out_channels=16, num_classes=3,
                       norm_cfg=CBN)
    feats = [torch.randn(2, c, s, s) for c, s in ((8, 32), (16, 16), (32, 8))]
    rois = torch.randn(20, 16, 7, 7)
    masks = torch.randn(5, 16, 14, 14)

    def loss():
        cls, reg = box(rois)
        return sum(o.mean() for o in neck(feats)) + cls.square().mean() + reg.square().mean() + \
            mask(masks).square().mean()
    _train_steps(torch.nn.ModuleList([neck, box, mask]), loss)
    for m in _layers(neck) + _layers(box) + _layers(mask):
        assert m.cbn_dnu.dim() == 4 and m.cbn_valid.sum() == 2  # window 3: two stored steps


def _detector_inputs(with_mask):
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData
    inputs = torch.randn(2, 3, 128, 128)
    samples = []
    for i in range(2):
        s = DetDataSample(metainfo=dict(img_shape=(128, 128), ori_shape=(128, 128),
                                        pad_shape=(128, 128), scale_factor=(1.0, 1.0),
                                        batch_input_shape=(128, 128)))
        gt = InstanceData()
        gt.bboxes = torch.tensor([[10., 10., 60., 70.], [50. + i, 40., 120., 110.]])
        gt.labels = torch.tensor([1, 2])
        if with_mask:
            m = torch.zeros(2, 128, 128, dtype=torch.uint8)
            m[0, 10:70, 10:60] = 1
            m[1, 40:110, 51:120] = 1
            gt.masks = BitmapMasks(m.numpy(), 128, 128)
        s.gt_instances = gt
        samples.append(s)
    return inputs, samples


@pytest.mark.integration
@pytest.mark.parametrize('detector', ['faster-rcnn', 'mask-rcnn'])
def test_stock_detector_with_cbn_in_fpn_and_heads_trains(detector):
    from mmdet.registry import MODELS
    base = {'faster-rcnn': 'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py',
            'mask-rcnn': 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'}[detector]
    cfg = get_config(base)  # mmdet's own packaged config
    model_cfg = cfg.model
    model_cfg.backbone.init_cfg = None
    model_cfg.backbone.depth = 18
    model_cfg.neck.in_channels = [64, 128, 256, 512]
    model_cfg.neck.norm_cfg = CBN
    model_cfg.roi_head.bbox_head.update(type='Shared4Conv1FCBBoxHead', conv_out_channels=256,
                                        norm_cfg=CBN)
    if detector == 'mask-rcnn':
        model_cfg.roi_head.mask_head.norm_cfg = CBN
    model = MODELS.build(model_cfg)
    layers = _layers(model)
    assert len(layers) == 8 + 4 + (4 if detector == 'mask-rcnn' else 0)
    inputs, samples = _detector_inputs(detector == 'mask-rcnn')
    model.train()

    def loss():
        losses = model.loss(inputs, samples)
        return sum(v.sum() if isinstance(v, torch.Tensor) else sum(v) for k, v in losses.items()
                   if 'loss' in k)
    _train_steps(model, loss, steps=3)
    assert all(m.cbn_dnu.dim() == 4 and m.cbn_step.item() == 3 for m in layers)
    model.eval()
    with torch.no_grad():
        results = model.predict(inputs, samples)
    assert len(results) == 2


def _train_resnet(depth, with_cp=False, steps=4, **cbn):
    """Outputs and gradients of ``steps`` SGD steps of mmdet's ResNet with CBN in every layer."""
    from mmdet.models.backbones import ResNet
    norm_cfg = dict(type='CBN', window=3, burnin=1, **cbn)
    torch.manual_seed(0)
    net = ResNet(depth, with_cp=with_cp, norm_cfg=norm_cfg, base_channels=8, norm_eval=False).double()
    opt = torch.optim.SGD(net.parameters(), lr=0.02)
    g = torch.Generator().manual_seed(1)
    steps_seen = []
    for _ in range(steps):
        out = net(torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=g))
        opt.zero_grad()
        sum(o.square().mean() for o in out).backward()
        steps_seen.append(([o.detach() for o in out], [p.grad.clone() for p in net.parameters()]))
        opt.step()
    return net, steps_seen


@pytest.mark.integration
def test_resnet_with_cp_trains_exactly_as_without():
    """mmdet's ResNet ``with_cp=True`` (torch.utils.checkpoint per block, reentrant) with CBN in
    every layer: 4 SGD steps in float64 give the outputs and gradients of the same backbone
    without checkpointing, with no warning of ours, and every layer stored derivatives. (Not
    bit for bit: checkpointing's backward sums the block input's gradient in another order, and
    training amplifies that rounding: with plain BN (window 1) this ResNet-50 differs by 8e-8
    after 4 steps, CBN by the same; plain averaging differs from CBN by 10.)"""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter('always')
        ckpt, got = _train_resnet(50, with_cp=True)
    assert not [w for w in rec if 'CBN' in str(w.message) or 'compensation' in str(w.message)]
    plain, want = _train_resnet(50)
    _, avg = _train_resnet(50, compensate=False)
    for (out_g, grad_g), (out_w, grad_w), (out_a, _) in zip(got, want, avg):
        for a, b in zip(out_g, out_w):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        for a, b in zip(grad_g, grad_w):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert max((a - b).abs().max() for a, b in zip(out_w, out_a)) > 0.01  # compensation matters
    layers = _layers(ckpt)
    assert all(m.cbn_dnu.dim() == 4 and m.cbn_dnu.abs().sum() > 0 for m in layers)
    for a, b in zip(_layers(plain), layers):
        torch.testing.assert_close(b.cbn_deriv, a.cbn_deriv, rtol=1e-5, atol=1e-8)
