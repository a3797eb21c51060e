"""The backbone pretraining tool: only the train digits, deterministic, loadable by mmdet."""
import os.path as osp

import numpy as np
import pytest
import torch

from tools import pretrain_backbone as pb

TINY = ['--num-train', '96', '--num-val', '32', '--epochs', '1', '--batch-size', '32',
        '--threads', '1']


def test_patches_draw_only_from_their_split_of_digit_scans(monkeypatch):
    from cbn_mmdet.datasets import digits_coco
    pools = digits_coco.digit_pools(1797)
    assert not set(pools['train']) & set(pools['val'])
    assert len(pools['train']) + len(pools['val']) == 1797
    seen = []
    real = digits_coco.render_canvas

    def spy(rng, images, labels, pool, *args, **kwargs):
        seen.append(pool)
        return real(rng, images, labels, pool, *args, **kwargs)
    monkeypatch.setattr(digits_coco, 'render_canvas', spy)
    for split in ('train', 'val'):
        seen.clear()
        x, y = pb.render_patches(split, 20, seed=0)
        assert x.shape == (20, 3, 48, 48) and x.dtype == np.float32 and set(y) <= set(range(10))
        assert seen and all(np.array_equal(p, pools[split]) for p in seen)


@pytest.mark.integration
def test_pretraining_is_deterministic_and_loads_as_mmdet_pretrained(tmp_path):
    a, b = str(tmp_path / 'a.pth'), str(tmp_path / 'b.pth')
    meta = pb.main(TINY + ['--out', a])
    pb.main(TINY + ['--out', b])
    sa, sb = (torch.load(p, weights_only=True)['state_dict'] for p in (a, b))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert 0.0 <= meta['val_accuracy'] <= 1.0
    assert pb.main(TINY + ['--out', a]) == meta          # same settings: a no-op
    with pytest.raises(SystemExit, match='other settings'):
        pb.main(TINY + ['--out', a, '--epochs', '2'])

    # the study configs' init_cfg loads it into the detector's backbone (mmdet's Pretrained)
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmdet.registry import MODELS
    cfg = Config.fromfile(osp.join(pb.ROOT, 'configs/studies/paper_table/'
                                   'mask-rcnn_r18-w32-digits_fpn_cbn_4xb4-12e_digits.py'))
    cfg.model.backbone.init_cfg.checkpoint = a
    init_default_scope('mmdet')
    model = MODELS.build(cfg.model)
    model.init_weights()
    got = model.backbone.state_dict()
    assert set(got) == set(sa)
    for k, v in sa.items():
        assert torch.equal(got[k], v), k
