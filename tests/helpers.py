"""Shared test helpers: a tiny digits dataset and running the repo's tools."""
import os
import os.path as osp
import subprocess
import sys

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
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
    """Run a repo tool with this interpreter; return stdout+stderr, raise with it on failure."""
    full_env = dict(os.environ, **(env or {}))
    proc = subprocess.run([sys.executable] + list(args), cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=full_env, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f'{args} exited {proc.returncode}:\n{proc.stdout[-6000:]}')
    return proc.stdout


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
