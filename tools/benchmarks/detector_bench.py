"""Detector-level benchmark: a full train step (forward, backward, SGD) of Faster / Mask R-CNN
R50-FPN with the norm under test in FPN and heads: frozen-BN baseline vs GN vs CBN configs.

    python tools/benchmarks/detector_bench.py [--device cpu|cuda] [--size 800 1216] [--images 2]
        [--iters N] [--json out.json]

Random images with a few boxes (and masks); random initialization (no download). Prints median
time per step and peak memory (CUDA), each also as a ratio to the baseline of the same run.
Defaults: 2 images of 800x1216 on CUDA; 2 images of 320x480 on CPU (a spot check).
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from tools.benchmarks.layer_bench import environment  # noqa: E402

CONFIGS = {
    'faster-rcnn': {n: f'configs/cbn/faster-rcnn_r50_fpn_{n}_4xb4-1x_coco.py'
                    for n in ('4conv1fc', 'gn', 'cbn')},
    'mask-rcnn': {n: f'configs/cbn/mask-rcnn_r50_fpn_{n}_4xb4-1x_coco.py'
                  for n in ('4conv1fc', 'gn', 'cbn')},
}


def build(config, device):
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    import cbn_mmdet  # noqa: F401
    cfg = Config.fromfile(os.path.join(ROOT, config))
    init_default_scope('mmdet')
    cfg.model.backbone.init_cfg = None
    from mmdet.registry import MODELS
    model = MODELS.build(cfg.model).to(device)
    model.train()
    return model


def inputs(n, h, w, with_mask, device):
    from mmdet.structures import DetDataSample
    from mmdet.structures.mask import BitmapMasks
    from mmengine.structures import InstanceData
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(n, 3, h, w, generator=g).to(device)
    samples = []
    for _ in range(n):
        s = DetDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w),
                                        scale_factor=(1.0, 1.0), batch_input_shape=(h, w)))
        gt = InstanceData()
        k = 6
        xy = torch.rand(k, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
        wh = (torch.rand(k, 2, generator=g) * 0.25 + 0.05) * torch.tensor([w, h])
        boxes = torch.cat([xy, xy + wh], 1)
        gt.bboxes = boxes.to(device)
        gt.labels = torch.randint(0, 80, (k,), generator=g).to(device)
        if with_mask:
            m = torch.zeros(k, h, w, dtype=torch.uint8)
            for i, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
                m[i, y0:y1, x0:x1] = 1
            gt.masks = BitmapMasks(m.numpy(), h, w)
        s.gt_instances = gt
        samples.append(s)
    return imgs, samples


def step(model, opt, imgs, samples):
    losses = model.loss(imgs, samples)
    loss = sum(v.sum() if isinstance(v, torch.Tensor) else sum(x.sum() for x in v)
               for k, v in losses.items() if 'loss' in k)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def bench(detector, device, n, h, w, iters, warmup):
    sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
    imgs, samples = inputs(n, h, w, detector == 'mask-rcnn', device)
    setups, peaks = {}, {}
    for norm, config in CONFIGS[detector].items():
        torch.manual_seed(0)
        model = build(config, device)
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        if device == 'cuda':
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        for _ in range(warmup):
            step(model, opt, imgs, samples)
        sync()
        if device == 'cuda':
            peaks[norm] = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
            model.cpu()  # free the GPU for the next model; moved back before timing
            torch.cuda.empty_cache()
        setups[norm] = (model, opt)
    times = {k: [] for k in setups}
    for norm, (model, opt) in setups.items():
        model.to(device)
        for _ in range(iters):
            sync()
            t = time.perf_counter()
            step(model, opt, imgs, samples)
            sync()
            times[norm].append(time.perf_counter() - t)
        if device == 'cuda':
            model.cpu()
            torch.cuda.empty_cache()
    return {k: (statistics.median(v) * 1e3, peaks.get(k)) for k, v in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--size', type=int, nargs=2, default=None, metavar=('H', 'W'))
    p.add_argument('--images', type=int, default=2)
    p.add_argument('--iters', type=int, default=None)
    p.add_argument('--warmup', type=int, default=None)
    p.add_argument('--detectors', default='faster-rcnn,mask-rcnn')
    p.add_argument('--json')
    a = p.parse_args(argv)
    h, w = a.size or ((800, 1216) if a.device == 'cuda' else (320, 480))
    iters = a.iters or (20 if a.device == 'cuda' else 5)
    warmup = a.warmup or (5 if a.device == 'cuda' else 2)
    rows = []
    print(f'# train step, {a.images} images of {h}x{w}, median of {iters}; {environment(a.device)}')
    print(f"{'detector':>12} {'norm':>9} {'ms/step':>9} {'vs base':>8} {'peak GiB':>9} {'vs base':>8}")
    for det in a.detectors.split(','):
        res = bench(det, a.device, a.images, h, w, iters, warmup)
        bt, bm = res['4conv1fc']
        for norm, (t, mem) in res.items():
            mem_s = f'{mem:9.2f} {mem / bm:7.2f}x' if mem is not None else f"{'-':>9} {'-':>8}"
            print(f'{det:>12} {norm:>9} {t:9.1f} {t / bt:7.2f}x {mem_s}')
            rows.append(dict(detector=det, norm=norm, ms=t, time_vs_base=t / bt, peak_gib=mem,
                             mem_vs_base=(mem / bm if mem is not None else None)))
        print(f"{'':>12} CBN / GN time = {res['cbn'][0] / res['gn'][0]:.2f}x")
    if a.json:
        with open(a.json, 'w') as f:
            json.dump(dict(environment=environment(a.device), images=a.images, size=[h, w],
                           iters=iters, rows=rows), f, indent=1)
    return rows


if __name__ == '__main__':
    main()
