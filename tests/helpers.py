"""Shared test helpers: a tiny digits dataset and running the repo's tools."""
import os
import os.path as osp
import sys
import warnings

import pytest
import torch

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def _works(fn) -> bool:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            return bool(fn())
    except (RuntimeError, NotImplementedError):
        return False


def _fp16_autocast_cpu():
    with torch.autocast('cpu', dtype=torch.float16):
        return torch.ones(2, 2).mm(torch.ones(2, 2)).dtype == torch.float16


def _fp16_conv_cpu():
    x = torch.ones(1, 1, 3, 3, dtype=torch.float16)
    return torch.nn.functional.conv2d(x, x).dtype == torch.float16


# What an older torch lacks on CPU (torch 2.1: autocast only with bfloat16, no float16 conv).
# Tests needing these skip there with the reason; on torches that have them nothing is skipped.
CPU_FP16_AUTOCAST = _works(_fp16_autocast_cpu)
CPU_FP16_CONV = _works(_fp16_conv_cpu)
needs_cpu_fp16_autocast = pytest.mark.skipif(
    not CPU_FP16_AUTOCAST, reason=f'torch {torch.__version__} has no float16 autocast on CPU '
                                  '(AutocastCPU supports only bfloat16 before torch 2.4)')
needs_cpu_fp16_conv = pytest.mark.skipif(
    not CPU_FP16_CONV, reason=f'torch {torch.__version__} has no float16 conv2d on CPU '
                              '("slow_conv2d_cpu" not implemented for Half)')


def _torch_load_is_safe_by_default():
    """torch >= 2.6: torch.load defaults to weights_only=True and refuses arbitrary objects."""
    import argparse
    import io
    buf = io.BytesIO()
    torch.save({'x': argparse.Namespace()}, buf)
    buf.seek(0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            torch.load(buf)
    except Exception:
        return True
    return False


TORCH_LOAD_IS_SAFE = _torch_load_is_safe_by_default()
# float16 as a parametrize value for tests that run it through CPU autocast / CPU convs
FP16_AUTOCAST_CPU = pytest.param(torch.float16, marks=needs_cpu_fp16_autocast, id='float16')
FP16_CONV_CPU = pytest.param(torch.float16, marks=needs_cpu_fp16_conv, id='float16')
QUICKSTART = 'configs/quickstart/mask-rcnn_r18-w32_fpn_cbn_1xb8-8e_digits.py'


def make_tiny_digits(out_dir, num_train=16, num_val=6, seed=0):
    from cbn_mmdet.datasets.digits_coco import generate
    generate(out_dir, seed=seed, num_train=num_train, num_val=num_val, size=128)
    return out_dir


def digits_options(data_root, batch_size=4):
    """--cfg-options that point a digits config at another data root (tiny test data)."""
    root = data_root.rstrip('/') + '/'
    return [
        f'train_dataloader.dataset.data_root={root}',
        f'val_dataloader.dataset.data_root={root}',
        f'test_dataloader.dataset.data_root={root}',
        f'val_evaluator.ann_file={root}annotations/instances_val.json',
        f'test_evaluator.ann_file={root}annotations/instances_val.json',
        f'train_dataloader.batch_size={batch_size}',
        'train_dataloader.num_workers=0', 'train_dataloader.persistent_workers=False',
        'val_dataloader.num_workers=0', 'val_dataloader.persistent_workers=False',
        'test_dataloader.num_workers=0', 'test_dataloader.persistent_workers=False',
        'default_hooks.logger.interval=1',
    ]


def run_tool(args, env=None, timeout=900):
    """Run a repo tool with this interpreter (under a deadline: tests/multiproc.py); return
    stdout+stderr, raise with it on failure."""
    from tests.multiproc import run
    full_env = dict(os.environ, **(env or {}))
    rc, out = run([sys.executable] + list(args), cwd=ROOT, env=full_env, deadline=timeout,
                  what=' '.join(args[:3]))
    if rc != 0:
        raise AssertionError(f'{args} exited {rc}:\n{out[-6000:]}')
    return out


def digits_config(config, data_root, out_path, with_mask, batch_size=2, extra=None):
    """Write ``config`` with its data settings replaced by the digits dataset at ``data_root``
    (10 classes, no pretrained download), for short end-to-end runs on CPU. Returns the path."""
    from mmengine.config import Config
    cfg = Config.fromfile(osp.join(ROOT, config))
    data = Config.fromfile(osp.join(ROOT, 'configs/_base_/datasets/digits_instance.py'))
    root = data_root.rstrip('/') + '/'
    for key in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        loader = data[key]
        loader.dataset.data_root = root
        loader.num_workers = 0
        loader.persistent_workers = False
        cfg[key] = loader
    cfg.train_dataloader.batch_size = batch_size
    for key in ('val_evaluator', 'test_evaluator'):
        ev = data[key]
        ev.ann_file = root + 'annotations/instances_val.json'
        ev.metric = ['bbox', 'segm'] if with_mask else ['bbox']
        cfg[key] = ev
    cfg.model.backbone.init_cfg = None
    cfg.model.roi_head.bbox_head.num_classes = 10
    if with_mask:
        cfg.model.roi_head.mask_head.num_classes = 10
    cfg.train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=1, val_interval=100)
    cfg.default_hooks.logger.interval = 1
    cfg.default_hooks.checkpoint.interval = 1
    if extra:
        cfg.merge_from_dict(extra)
    cfg.dump(out_path)
    return out_path
