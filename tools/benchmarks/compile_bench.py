"""What torch.compile still buys a CBN backbone whose conv->CBN pairs run eagerly.

    python tools/benchmarks/compile_bench.py [--depth 18] [--size 128] [--images 2]
        [--iters 10] [--backend inductor] [--device cpu] [--json out.json]

Times a training step (forward, backward, SGD) of mmdet's ResNet with BN and with CBN (window 4,
past burn-in), eager and compiled (``torch.compile``; for CBN after
``keep_producing_convs_eager``, as CBNHook does), and prints ms per step and the compiled /
eager ratio. The first compiled steps (compilation) are excluded; they are reported apart.
"""
import argparse
import copy
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from cbn_mmdet.cbn import keep_producing_convs_eager  # noqa: E402


def build(norm: str, depth: int, device):
    from mmdet.models.backbones import ResNet
    norm_cfg = dict(type='BN') if norm == 'BN' else dict(type='CBN', window=4, burnin=0)
    torch.manual_seed(0)
    model = ResNet(depth, norm_cfg=norm_cfg, norm_eval=False).to(device)
    model.train()  # mmdet's ResNet.train returns None
    return model


def time_steps(model, x, iters, warmup):
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        out = model(x)
        opt.zero_grad()
        sum(o.float().square().mean() for o in out).backward()
        opt.step()

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(x)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    sync(x)
    return (time.perf_counter() - t0) / iters * 1e3, first


def sync(x):
    if x.is_cuda:
        torch.cuda.synchronize()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--depth', type=int, default=18, choices=(18, 34, 50, 101))
    p.add_argument('--size', type=int, default=128)
    p.add_argument('--images', type=int, default=2)
    p.add_argument('--iters', type=int, default=10)
    p.add_argument('--warmup', type=int, default=3)
    p.add_argument('--backend', default='inductor')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--json')
    a = p.parse_args(argv)
    import cbn_mmdet  # noqa: F401  registers CBN
    x = torch.randn(a.images, 3, a.size, a.size, device=a.device)
    rows = []
    for norm in ('BN', 'CBN'):
        eager = build(norm, a.depth, a.device)
        compiled_model = copy.deepcopy(eager)
        eager_convs = keep_producing_convs_eager(compiled_model) if norm == 'CBN' else []
        torch._dynamo.reset()
        compiled = torch.compile(compiled_model, backend=a.backend)
        ms_e, _ = time_steps(eager, x, a.iters, a.warmup)
        ms_c, first = time_steps(compiled, x, a.iters, a.warmup)
        rows.append(dict(norm=norm, eager_ms=ms_e, compiled_ms=ms_c, ratio=ms_c / ms_e,
                         warmup_s=first, eager_convs=len(eager_convs)))
    print(f'# ResNet-{a.depth}, {a.images}x3x{a.size}x{a.size}, {a.device}, backend {a.backend}, '
          f'torch {torch.__version__}; ms per training step ({a.iters} steps after {a.warmup})')
    print('| norm | eager | compiled | compiled / eager | eager convs | first steps (compile) |')
    print('|---|---|---|---|---|---|')
    for r in rows:
        print(f"| {r['norm']} | {r['eager_ms']:.1f} | {r['compiled_ms']:.1f} | {r['ratio']:.2f}x "
              f"| {r['eager_convs']} | {r['warmup_s']:.0f} s |")
    if a.json:
        with open(a.json, 'w') as f:
            json.dump(dict(args=vars(a), torch=torch.__version__, rows=rows), f, indent=1)


if __name__ == '__main__':
    main()
