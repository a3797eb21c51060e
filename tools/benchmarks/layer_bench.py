"""Layer-level benchmark: conv3x3 + norm, forward + backward + SGD step.

    python tools/benchmarks/layer_bench.py [--device cpu|cuda] [--shapes fpn|head|cpu|all]
        [--iters N] [--json out.json]

Norms: BN, GN(32), CBN (window 4, compensated), CBN plain averaging, the straightforward
autograd-derivative CBN of the tests, and the floor "BN + one extra weight-gradient conv".
Prints median time and peak memory (CUDA) per step, each also as a ratio to BN of the same run.
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from cbn_mmdet.cbn import CrossIterationBatchNorm2d  # noqa: E402
from tests.cbn.reference import ReferenceCBN  # noqa: E402

SHAPES = {
    # (N, C, H, W): FPN-like maps at 2 images, and the box head's RoIs
    'fpn': [(2, 256, 200, 304), (2, 256, 100, 152), (2, 256, 50, 76)],
    'head': [(512, 256, 7, 7)],
    'cpu': [(2, 64, 64, 64), (8, 64, 32, 32), (256, 64, 7, 7)],
}


class Floor(nn.Module):
    """BatchNorm2d plus one extra weight-gradient convolution of its input: the work CBN needs."""

    def __init__(self, c):
        super().__init__()
        self.bn = nn.BatchNorm2d(c)

    def forward(self, y):
        fn = y.grad_fn
        with torch.no_grad():
            torch.ops.aten.convolution_backward(
                y, fn._saved_input, fn._saved_weight, None, list(fn._saved_stride),
                list(fn._saved_padding), list(fn._saved_dilation), False, [0, 0],
                fn._saved_groups, [False, True, False])
        return self.bn(y)


class Reference(nn.Module):
    """The tests' autograd-derivative CBN wrapped as conv+norm (it runs the conv itself)."""

    def __init__(self, c, conv):
        super().__init__()
        self.conv = conv
        self.gamma = nn.Parameter(torch.ones(c))
        self.beta = nn.Parameter(torch.zeros(c))
        self.ref = ReferenceCBN(c, window=4)

    def forward(self, x):
        ref = self.ref
        ref.running_mean = ref.running_mean.to(x.device)
        ref.running_var = ref.running_var.to(x.device)
        return ref(self.conv, x, self.gamma, self.beta)


def make(kind, c, device):
    conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
    norms = {
        'BN': lambda: nn.BatchNorm2d(c),
        'GN': lambda: nn.GroupNorm(32, c),
        'CBN': lambda: CrossIterationBatchNorm2d(c, window=4, burnin=0),
        'CBN-avg': lambda: CrossIterationBatchNorm2d(c, window=4, burnin=0, compensate=False),
        'floor': lambda: Floor(c),
    }
    if kind == 'reference':
        model = Reference(c, conv)
    else:
        model = nn.Sequential(conv, norms[kind]())
    return model.to(device)


def _step(model, opt, x):
    out = model(x)
    out.float().square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def bench(norms, shape, device, iters, warmup):
    """Median step time (ms) and peak memory above the inputs (MiB, CUDA) per norm. The norms
    run interleaved, step by step, so that machine drift hits them all alike."""
    sync = torch.cuda.synchronize if device == 'cuda' else (lambda: None)
    x = torch.randn(*shape, device=device)
    setups, peaks = {}, {}
    for kind in norms:
        torch.manual_seed(0)
        model = make(kind, shape[1], device)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        if device == 'cuda':
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        for _ in range(warmup):
            _step(model, opt, x)
        sync()
        if device == 'cuda':
            peaks[kind] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        setups[kind] = (model, opt)
    times = {k: [] for k in norms}
    for _ in range(iters):
        for kind, (model, opt) in setups.items():
            sync()
            t = time.perf_counter()
            _step(model, opt, x)
            sync()
            times[kind].append(time.perf_counter() - t)
    return {k: (statistics.median(v) * 1e3, peaks.get(k)) for k, v in times.items()}


def environment(device):
    env = dict(torch=torch.__version__, python=platform.python_version(),
               machine=platform.machine(), processor=platform.processor() or platform.machine(),
               threads=torch.get_num_threads(), device=device,
               date=time.strftime('%Y-%m-%d'))
    if device == 'cuda':
        env['gpu'] = torch.cuda.get_device_name()
    return env


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--shapes', default=None, help='fpn, head, cpu or all (default: all on cuda, cpu on cpu)')
    p.add_argument('--norms', default='BN,GN,CBN,CBN-avg,reference,floor')
    p.add_argument('--iters', type=int, default=None)
    p.add_argument('--warmup', type=int, default=5)
    p.add_argument('--json', help='write results here')
    a = p.parse_args(argv)
    shape_set = a.shapes or ('all' if a.device == 'cuda' else 'cpu')
    shapes = sum(SHAPES.values(), []) if shape_set == 'all' else SHAPES[shape_set]
    iters = a.iters or (50 if a.device == 'cuda' else 20)
    norms = a.norms.split(',')
    rows = []
    print(f'# conv3x3 + norm, fwd+bwd+SGD step, median of {iters}; {environment(a.device)}')
    print(f"{'shape':>20} " + ' '.join(f'{n:>16}' for n in norms))
    for shape in shapes:
        res = bench(norms, shape, a.device, iters, a.warmup)
        bn_t, bn_m = res['BN']
        cells = []
        for n in norms:
            t, mem = res[n]
            cell = f'{t:7.2f}ms {t / bn_t:4.2f}x'
            if mem is not None:
                cell += f' {mem / bn_m:4.2f}xM'
            cells.append(f'{cell:>16}')
            rows.append(dict(shape=list(shape), norm=n, ms=t, time_vs_bn=t / bn_t, peak_mib=mem,
                             mem_vs_bn=(mem / bn_m if mem is not None else None)))
        print(f"{'x'.join(map(str, shape)):>20} " + ' '.join(cells))
        if 'floor' in res and 'CBN' in res:
            print(f"{'':>20} CBN / floor = {res['CBN'][0] / res['floor'][0]:.2f}x")
    if a.json:
        with open(a.json, 'w') as f:
            json.dump(dict(environment=environment(a.device), iters=iters, rows=rows), f, indent=1)
    return rows


if __name__ == '__main__':
    main()
