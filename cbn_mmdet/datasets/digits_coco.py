"""A small COCO-format detection / instance-segmentation dataset built from scikit-learn's
bundled handwritten digits (1,797 real 8x8 scans, 10 classes): no download needed.

Each canvas holds several upscaled digits (varied size, colour and position, some overlap)
over a textured background with unannotated clutter (digit fragments, lines). Masks are the
visible digit strokes; boxes are the masks' extents. Train and val canvases draw from disjoint
sets of the original digit scans. Output is deterministic for a given seed.
"""
import json
import os
import os.path as osp
from typing import Dict, List, Tuple

import numpy as np

FORMAT_VERSION = 1
CLASSES = tuple(str(i) for i in range(10))


def _load_digits():
    from sklearn.datasets import load_digits
    d = load_digits()
    return d.images.astype(np.float32) / 16.0, d.target.astype(np.int64)


def _resize(img: np.ndarray, size: int) -> np.ndarray:
    """Bilinear upscaling of a small grey image to (size, size)."""
    import cv2
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR)


def _background(rng, size: int) -> np.ndarray:
    base = rng.uniform(0.15, 0.6, size=3)
    grad = np.linspace(-1, 1, size)[None, :, None] * rng.uniform(-0.15, 0.15, size=3)
    noise = rng.normal(0, rng.uniform(0.01, 0.06), size=(size, size, 1))
    return np.clip(base[None, None] + grad + noise, 0, 1)


def _paint(canvas, alpha, x, y, color):
    h, w = alpha.shape
    region = canvas[y:y + h, x:x + w]
    region[:] = region * (1 - alpha[..., None]) + color[None, None] * alpha[..., None]


def _contrasting_colour(rng, bg_mean):
    for _ in range(20):
        c = rng.uniform(0, 1, size=3)
        if abs(c.mean() - bg_mean) > 0.3:
            return c
    return 1.0 - np.full(3, bg_mean)


def render_canvas(rng, images, labels, pool, size, digits_range, scale_range, max_iou=0.35):
    """One canvas: (HxWx3 uint8 image, list of (label, binary mask))."""
    canvas = _background(rng, size)
    bg_mean = float(canvas.mean())
    # Clutter: unannotated digit fragments and thin lines.
    for _ in range(rng.integers(0, 4)):
        frag = _resize(images[rng.choice(pool)], int(rng.integers(*scale_range)))
        cut = rng.integers(2, frag.shape[0] // 2)
        frag = frag[:cut] if rng.random() < 0.5 else frag[:, :cut]
        fy, fx = rng.integers(0, size - frag.shape[0]), rng.integers(0, size - frag.shape[1])
        _paint(canvas, np.clip(frag * 0.7, 0, 1), fx, fy, _contrasting_colour(rng, bg_mean))
    for _ in range(rng.integers(0, 3)):
        line = np.zeros((size, size), np.float32)
        r = rng.integers(0, size)
        if rng.random() < 0.5:
            line[r, :] = 0.6
        else:
            line[:, r] = 0.6
        _paint(canvas, line, 0, 0, _contrasting_colour(rng, bg_mean))

    placed: List[Tuple[int, np.ndarray, Tuple[int, int, int, int]]] = []
    n_digits = int(rng.integers(digits_range[0], digits_range[1] + 1))
    for _ in range(n_digits):
        for _attempt in range(20):
            s = int(rng.integers(*scale_range))
            x, y = int(rng.integers(0, size - s)), int(rng.integers(0, size - s))
            box = (x, y, x + s, y + s)
            if all(_iou(box, b) <= max_iou for _, _, b in placed):
                break
        else:
            continue
        idx = rng.choice(pool)
        alpha = np.clip(_resize(images[idx], s) * 1.4 - 0.1, 0, 1)
        full = np.zeros((size, size), bool)
        full[y:y + s, x:x + s] = alpha > 0.5
        if full.sum() < 8:
            continue
        _paint(canvas, alpha, x, y, _contrasting_colour(rng, bg_mean))
        # Later digits occlude earlier ones.
        placed = [(lab, m & ~full, b) for lab, m, b in placed]
        placed.append((int(labels[idx]), full, box))
    instances = [(lab, m) for lab, m, _ in placed if m.sum() >= 8]
    return (np.clip(canvas, 0, 1) * 255).astype(np.uint8), instances


def _iou(a, b):
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


def _annotation(mask, label, ann_id, image_id):
    from pycocotools import mask as mask_utils
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle['counts'] = rle['counts'].decode('ascii')
    return dict(id=ann_id, image_id=image_id, category_id=label + 1, iscrowd=0,
                bbox=[int(x0), int(y0), int(x1 - x0), int(y1 - y0)], area=int(mask.sum()),
                segmentation=rle)


def digit_pools(num_digits: int, seed: int = 0, val_fraction: float = 0.22) -> Dict[str, np.ndarray]:
    """Indices of the digit scans each split draws from: ``{'train': ..., 'val': ...}``, disjoint.

    Anything trained on the digits before detection (e.g. the backbone pretraining) must use
    only the ``train`` pool of the same seed, or the detection val split is no longer unseen.
    """
    order = np.random.default_rng(seed).permutation(num_digits)
    n_val = int(round(num_digits * val_fraction))
    return dict(val=order[:n_val], train=order[n_val:])


def generate(out_dir: str, seed: int = 0, num_train: int = 1000, num_val: int = 200,
             size: int = 128, digits_per_image: Tuple[int, int] = (2, 5),
             digit_size: Tuple[int, int] = (16, 44), val_fraction: float = 0.22) -> Dict:
    """Write the dataset under ``out_dir``; a no-op when the same dataset is already there.

    Layout: ``{train,val}/*.png`` and ``annotations/instances_{train,val}.json``. Returns the
    metadata dict also saved as ``meta.json`` (written last: its presence marks completion).
    """
    from PIL import Image
    meta = dict(format_version=FORMAT_VERSION, seed=seed, num_train=num_train, num_val=num_val,
                size=size, digits_per_image=list(digits_per_image), digit_size=list(digit_size),
                val_fraction=val_fraction)
    meta_path = osp.join(out_dir, 'meta.json')
    if osp.exists(meta_path):
        with open(meta_path) as f:
            existing = json.load(f)
        if {k: existing.get(k) for k in meta} == meta:
            return existing
        raise FileExistsError(f'{out_dir} holds a digits dataset made with other settings '
                              f'({existing}); remove it or choose another directory')
    images, labels = _load_digits()
    pools = digit_pools(len(images), seed, val_fraction)
    counts = dict(train=0, val=0)
    os.makedirs(osp.join(out_dir, 'annotations'), exist_ok=True)
    for split, n_images in (('train', num_train), ('val', num_val)):
        split_rng = np.random.default_rng([seed, 0 if split == 'train' else 1])
        os.makedirs(osp.join(out_dir, split), exist_ok=True)
        coco = dict(images=[], annotations=[],
                    categories=[dict(id=i + 1, name=c) for i, c in enumerate(CLASSES)])
        ann_id = 1
        for image_id in range(1, n_images + 1):
            img, instances = render_canvas(split_rng, images, labels, pools[split], size,
                                           digits_per_image, digit_size)
            name = f'{image_id:06d}.png'
            Image.fromarray(img).save(osp.join(out_dir, split, name))
            coco['images'].append(dict(id=image_id, file_name=name, height=size, width=size))
            for label, mask in instances:
                coco['annotations'].append(_annotation(mask, label, ann_id, image_id))
                ann_id += 1
        counts[split] = ann_id - 1
        with open(osp.join(out_dir, 'annotations', f'instances_{split}.json'), 'w') as f:
            json.dump(coco, f)
    meta.update(instances_train=counts['train'], instances_val=counts['val'])
    with open(meta_path, 'w') as f:
        json.dump(meta, f, indent=1)
    return meta
