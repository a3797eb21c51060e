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
