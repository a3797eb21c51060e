"""Memory the CBN layers keep, and checkpoint sizes, for every config in ``configs/cbn/``.

    python tools/benchmarks/memory_bench.py [CONFIG ...] [--steps 3] [--json out.json]
    python tools/benchmarks/memory_bench.py --device cuda --size 800 1333   # on a GPU

Builds each config's model (no pretrained weights), runs ``--steps`` windowed training steps
(burn-in 0) on one small random image (the window's size depends on the conv weights, not on
the image size) and sums over the CBN layers:
- window: the stored iterations (moments, projections, derivatives, validity, heads);
- kept: every tensor the layers hold between calls (window + work tensors + counters);
- state_dict: the model's state_dict (weights, BN buffers, the two counters per CBN layer),
  what a checkpoint holds with ``CBNHook(save_window=False)``; + window: with the default;
- all-reduce: bytes one training step would all-reduce if the layers were SyncCBN (forward:
  count, moments and derivative sums; backward: two C-vectors; float32).
Sizes are tensor bytes (``nbytes``), MiB; a checkpoint file adds the optimizer state and
a little pickle overhead.
On CUDA (``--device cuda``) each config also gets the peak memory of its last training step
(``torch.cuda.max_memory_allocated``, the whole model: weights, activations, optimizer, window)
at ``--size`` with the images per GPU of its name (``4xb2``: 2; ``--images`` otherwise).
"""
import argparse
import glob
import json
import os
import re
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from cbn_mmdet.cbn import CrossIterationBatchNorm2d  # noqa: E402
from cbn_mmdet.cbn.window import BUFFERS  # noqa: E402

MIB = 2 ** 20


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def layer_memory(layer) -> dict:
    """Bytes held by one CBN layer: its window, and everything it keeps between calls."""
    window = _nbytes(getattr(layer, n) for n in BUFFERS)
    work = _nbytes(layer._work.values())
    counters = _nbytes((layer.cbn_step, layer.cbn_skipped))
    return dict(window=window, kept=window + work + counters)


def allreduce_bytes(layer) -> int:
    """Bytes SyncCBN all-reduces per call of ``layer`` once the window is used (float32)."""
    c = layer.num_features
    d = layer.cbn_deriv
    deriv = d.shape[1] * d.shape[-1] if d.dim() == 4 else 0
    return 4 * (1 + 2 * c + deriv) + 4 * 2 * c


def images_per_gpu(config: str, default: int) -> int:
    """The per-GPU batch of a config named like mmdet's (``..._4xb2-1x_coco``), else ``default``."""
    found = re.search(r'_\d+xb(\d+)', os.path.basename(config))
    return int(found.group(1)) if found else default


def measure(config: str, steps: int, device: str = 'cpu', size=(128, 128), images: int = 1) -> dict:
    from mmdet.testing import demo_mm_inputs
    from mmengine.config import Config
    from mmengine.registry import init_default_scope

    from mmdet.registry import MODELS
    cfg = Config.fromfile(config)
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    cfg.model.backbone.init_cfg = None
    model = MODELS.build(cfg.model).to(device)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, CrossIterationBatchNorm2d)]
    row = dict(config=os.path.basename(config), layers=len(layers),
               window=sorted({m.window for _, m in layers}), images=images, size=list(size))
    cuda = torch.device(device).type == 'cuda'
    if layers or cuda:
        for _, m in layers:
            m.burnin = 0
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        with_mask = 'mask_head' in cfg.model.get('roi_head', {})
        torch.manual_seed(0)
        for i in range(steps):
            if cuda and i == steps - 1:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            data = demo_mm_inputs(batch_size=images, image_shapes=[(3, *size)] * images,
                                  num_items=[3] * images,
                                  num_classes=cfg.model.roi_head.bbox_head.num_classes,
                                  with_mask=with_mask)
            batch = model.data_preprocessor(dict(inputs=[d for d in data['inputs']],
                                                 data_samples=data['data_samples']), True)
            losses = model.loss(batch['inputs'], batch['data_samples'])
            opt.zero_grad()
            _sum_losses(losses).backward()
            opt.step()
        if cuda:
            torch.cuda.synchronize()
            row['peak_step_mib'] = torch.cuda.max_memory_allocated() / MIB
    mem = [layer_memory(m) for _, m in layers]
    state = model.state_dict()
    windows = {n: m.window_state() for n, m in layers}
    row.update(
        window_mib=sum(x['window'] for x in mem) / MIB,
        kept_mib=sum(x['kept'] for x in mem) / MIB,
        state_dict_mib=_nbytes(state.values()) / MIB,
        saved_window_mib=_nbytes(t for w in windows.values() for t in w.values()) / MIB,
        allreduce_mib=sum(allreduce_bytes(m) * max(m.ring.streams(), 1) for _, m in layers) / MIB)
    row['kept_ratio'] = row['kept_mib'] / row['window_mib'] if row['window_mib'] else None
    row['with_window_mib'] = row['state_dict_mib'] + row['saved_window_mib']
    return row


def _sum_losses(losses):
    """The total of mmdet's loss dict (values: tensors or lists of per-level tensors)."""
    total = 0
    for k, v in losses.items():
        if 'loss' in k:
            total = total + (sum(v) if isinstance(v, (list, tuple)) else v)
    return total


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('configs', nargs='*')
    p.add_argument('--steps', type=int, default=3)
    p.add_argument('--json')
    p.add_argument('--device', default='cpu', help="'cpu' or 'cuda'")
    p.add_argument('--size', type=int, nargs=2, default=(128, 128), metavar=('H', 'W'),
                   help='image size (default 128 128; the paper trains at about 800 1333)')
    p.add_argument('--images', type=int, default=1,
                   help='images per step for a config whose name has no NxbM (default 1)')
    args = p.parse_args()
    if torch.device(args.device).type == 'cuda' and not torch.cuda.is_available():
        p.error('--device cuda: no CUDA device here')
    if args.steps < 2:
        p.error(f'--steps must be >= 2 (a window holds iterations from step 2), got {args.steps}')
    configs = args.configs or sorted(glob.glob(os.path.join(ROOT, 'configs/cbn/*.py')))
    import cbn_mmdet  # noqa: F401  registers CBN
    rows = []
    cuda = torch.device(args.device).type == 'cuda'
    h, w = args.size
    print(f'# {args.steps} windowed steps, {h}x{w} images '
          f"({'per-GPU batch of the config name' if cuda else f'{args.images} per step'}); "
          f'torch {torch.__version__}, {args.device}; MiB')
    head = ('config', 'CBN layers', 'window', 'stored window', 'kept by layers', 'kept/window',
            'state_dict (save_window=False)', 'checkpoint window', 'state_dict + window',
            'SyncCBN all-reduce/step')
    if cuda:
        head += ('images', 'peak step memory')
    print('| ' + ' | '.join(head) + ' |')
    print('|' + '---|' * len(head))
    for config in configs:
        images = images_per_gpu(config, args.images) if cuda else args.images
        r = measure(config, args.steps, args.device, (h, w), images)
        rows.append(r)
        ratio = f"{r['kept_ratio']:.3f}" if r['kept_ratio'] else '-'
        print(f"| {r['config'][:-3]} | {r['layers']} | {','.join(map(str, r['window'])) or '-'} | "
              f"{r['window_mib']:.1f} | {r['kept_mib']:.1f} | {ratio} | {r['state_dict_mib']:.1f} | "
              f"{r['saved_window_mib']:.1f} | {r['with_window_mib']:.1f} | {r['allreduce_mib']:.2f} |"
              + (f" {r['images']} | {r['peak_step_mib']:.0f} |" if cuda else ''), flush=True)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(rows, f, indent=1)


if __name__ == '__main__':
    main()
