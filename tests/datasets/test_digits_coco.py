"""The embedded digits dataset: deterministic, valid COCO, masks inside boxes, no-op reruns."""
import hashlib
import os
import os.path as osp

import numpy as np
import pytest
from pycocotools.coco import COCO

from cbn_mmdet.datasets.digits_coco import generate


def _digest(root):
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            with open(osp.join(dirpath, name), 'rb') as f:
                h.update(name.encode() + f.read())
    return h.hexdigest()


def test_deterministic_and_seed_dependent(tmp_path):
    a = generate(str(tmp_path / 'a'), seed=3, num_train=6, num_val=3)
    b = generate(str(tmp_path / 'b'), seed=3, num_train=6, num_val=3)
    generate(str(tmp_path / 'c'), seed=4, num_train=6, num_val=3)
    assert a == b
    assert _digest(tmp_path / 'a') == _digest(tmp_path / 'b') != _digest(tmp_path / 'c')


def test_rerun_is_a_no_op_and_other_settings_refuse(tmp_path):
    root = str(tmp_path / 'd')
    generate(root, num_train=4, num_val=2)
    stamp = os.stat(osp.join(root, 'train', '000001.png')).st_mtime_ns
    generate(root, num_train=4, num_val=2)
    assert os.stat(osp.join(root, 'train', '000001.png')).st_mtime_ns == stamp
    with pytest.raises(FileExistsError):
        generate(root, num_train=5, num_val=2)


def test_valid_coco_with_masks_inside_boxes(tmp_path):
    root = str(tmp_path / 'e')
    meta = generate(root, num_train=12, num_val=4)
    coco = COCO(osp.join(root, 'annotations', 'instances_train.json'))
    assert sorted(coco.getCatIds()) == list(range(1, 11))
    assert len(coco.getImgIds()) == 12 and meta['instances_train'] == len(coco.getAnnIds())
    per_image = [len(coco.getAnnIds(imgIds=i)) for i in coco.getImgIds()]
    assert min(per_image) >= 1 and max(per_image) >= 3  # several digits per canvas
    for ann in coco.loadAnns(coco.getAnnIds()):
        mask = coco.annToMask(ann)
        assert mask.sum() == ann['area'] >= 8
        ys, xs = np.nonzero(mask)
        x, y, w, h = ann['bbox']
        assert xs.min() == x and ys.min() == y and xs.max() + 1 == x + w and ys.max() + 1 == y + h


def test_train_and_val_use_disjoint_digit_scans(tmp_path):
    """Val canvases are drawn from digit scans never used for training."""
    from cbn_mmdet.datasets import digits_coco
    seen = {'train': set(), 'val': set()}
    real = digits_coco.render_canvas

    def spy(rng, images, labels, pool, *args, **kwargs):
        split = 'train' if len(pool) > 800 else 'val'
        seen[split].update(int(i) for i in pool)
        return real(rng, images, labels, pool, *args, **kwargs)
    digits_coco.render_canvas = spy
    try:
        generate(str(tmp_path / 'f'), num_train=2, num_val=2)
    finally:
        digits_coco.render_canvas = real
    assert seen['train'] and seen['val'] and not seen['train'] & seen['val']
    assert len(seen['train']) + len(seen['val']) == 1797
