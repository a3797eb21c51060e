"""Pretrain the quick-start backbone (mmdet ResNet-18, base width 32, BN) on digit classification.

The stand-in for ImageNet weights in the studies: a checkpoint that mmdet's
``init_cfg=dict(type='Pretrained', checkpoint=...)`` loads into the detector's backbone.

    python tools/pretrain_backbone.py [--out data/pretrained/resnet18-w32_digits.pth] [--seed 0]

Patches are rendered like the detection canvases (one digit of 16-44 px on a textured
48x48 background with clutter, tools/make_digits_coco.py's renderer) from the **train** pool of
digit scans only, so the detection val split stays unseen. Large batch (64), BN in train mode,
SGD with a one-cycle schedule. Deterministic for a given seed and thread count; a no-op when the
checkpoint is there with the same settings.
"""
import argparse
import os
import os.path as osp
import sys
import time

import numpy as np

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, ROOT)

# mmdet's detection data_preprocessor (RGB order after its bgr_to_rgb).
MEAN = np.array([123.675, 116.28, 103.53], np.float32)
STD = np.array([58.395, 57.12, 57.375], np.float32)
BACKBONE = dict(type='ResNet', depth=18, base_channels=32, num_stages=4, out_indices=(3, ),
                norm_cfg=dict(type='BN', requires_grad=True), norm_eval=False, style='pytorch')


def render_patches(split, n, seed, size=48):
    """``n`` single-digit patches of the split's digit pool: (N, 3, size, size) float32, labels."""
    from cbn_mmdet.datasets.digits_coco import _load_digits, digit_pools, render_canvas
    images, labels = _load_digits()
    pool = digit_pools(len(images), seed=0)[split]  # the dataset's own split (its seed 0)
    rng = np.random.default_rng([seed, 0 if split == 'train' else 1, 7])
    xs, ys = [], []
    while len(xs) < n:
        img, inst = render_canvas(rng, images, labels, pool, size, (1, 1), (16, 44))
        if inst:
            xs.append((img.astype(np.float32) - MEAN) / STD)
            ys.append(inst[0][0])
    return np.stack(xs).transpose(0, 3, 1, 2).copy(), np.array(ys, np.int64)


def build(num_classes=10):
    import torch.nn as nn
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    register_all_modules()
    backbone = MODELS.build(dict(BACKBONE))
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, num_classes))
    return backbone, head


def accuracy(backbone, head, x, y, batch=256):
    import torch
    backbone.eval()
    head.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out = head(backbone(x[i:i + batch])[-1])
            correct += int((out.argmax(1) == y[i:i + batch]).sum())
    return correct / len(x)


def main(argv=None):
    import torch
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--out', default='data/pretrained/resnet18-w32_digits.pth')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--num-train', type=int, default=20000, help='training patches')
    p.add_argument('--num-val', type=int, default=2000, help='held-out patches (val digit pool)')
    p.add_argument('--epochs', type=int, default=6)
    p.add_argument('--batch-size', type=int, default=64)
    p.add_argument('--lr', type=float, default=0.1, help='peak lr of the one-cycle schedule')
    p.add_argument('--threads', type=int, default=2)
    a = p.parse_args(argv)
    settings = {k: v for k, v in vars(a).items() if k != 'out'}
    out = osp.join(ROOT, a.out) if not osp.isabs(a.out) else a.out
    if osp.exists(out):
        meta = torch.load(out, map_location='cpu', weights_only=True).get('meta', {})
        if meta.get('settings') == settings:
            print(f'{a.out}: already there (val accuracy {meta["val_accuracy"]:.4f})')
            return meta
        sys.exit(f'{a.out} was made with other settings ({meta.get("settings")}); remove it first')

    t0 = time.time()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    xtr, ytr = map(torch.from_numpy, render_patches('train', a.num_train, a.seed))
    xva, yva = map(torch.from_numpy, render_patches('val', a.num_val, a.seed))
    backbone, head = build()
    params = list(backbone.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=a.lr, momentum=0.9, weight_decay=1e-4, nesterov=True)
    steps = a.epochs * (len(xtr) // a.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=a.lr, total_steps=steps, pct_start=0.2)
    gen = torch.Generator().manual_seed(a.seed)
    for epoch in range(a.epochs):
        backbone.train()
        head.train()
        order = torch.randperm(len(xtr), generator=gen)
        total = 0.0
        for i in range(len(xtr) // a.batch_size):
            idx = order[i * a.batch_size:(i + 1) * a.batch_size]
            loss = torch.nn.functional.cross_entropy(head(backbone(xtr[idx])[-1]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        print(f'epoch {epoch + 1}/{a.epochs}: train loss {total / (i + 1):.4f} '
              f'[{time.time() - t0:.0f}s]', flush=True)
    val_acc = accuracy(backbone, head, xva, yva)
    meta = dict(settings=settings, backbone=BACKBONE, val_accuracy=val_acc,
                train_accuracy=accuracy(backbone, head, xtr[:2000], ytr[:2000]),
                seconds=round(time.time() - t0, 1), torch=str(torch.__version__))
    os.makedirs(osp.dirname(out), exist_ok=True)
    torch.save(dict(state_dict=backbone.state_dict(), meta=meta), out)
    print(f'{a.out}: val accuracy {val_acc:.4f} (train {meta["train_accuracy"]:.4f}), '
          f'{meta["seconds"]:.0f}s')
    return meta


if __name__ == '__main__':
    main()
