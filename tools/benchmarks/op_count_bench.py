"""Fixed cost per call: ATen ops dispatched per training step, and time per step at small shapes.

    python tools/benchmarks/op_count_bench.py [--device cpu|cuda] [--iters N] [--threads T]
        [--breakdown] [--matmul-precision highest|high|medium] [--json out.json]

Norms: BN, GN(4), CBN (window 4, compensated), CBN plain averaging (window 4). The count is one
training step of conv3x3 + norm (forward + backward, the 6th step, window full) counted with a
``TorchDispatchMode``: every ATen op that is not a view (``_unsafe_view``, an alias, counted as a
view), minus the ops of conv + identity + the same loss. Device-independent apart from the
kernel set (fused CUDA kernels vs portable ops): with ``--device cuda`` the CUDA branch is
counted and timed. On CPU ``--emulate-cuda`` counts the CUDA branch through the tests' CPU
emulations of the fused kernels. Time: median of ``--iters`` steps (forward, backward, SGD),
the norms interleaved step by step. ``--matmul-precision high`` (TF32) or ``medium`` (bf16)
counts the layer as it runs when the user lowered float32 matmul precision: the weight's
products then go in three exact parts (docs/behaviour.md, TF32).
"""
import argparse
import collections
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from cbn_mmdet.cbn import CrossIterationBatchNorm2d  # noqa: E402

SHAPES = [(1, 16, 4, 4), (1, 64, 8, 8), (2, 64, 32, 32)]
COUNT_SHAPE = (1, 16, 4, 4)
VIEW_LIKE = {'_unsafe_view', 'detach'}


class OpCounter(TorchDispatchMode):
    """Counts dispatched non-view ATen ops by name."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not func.is_view and name not in VIEW_LIKE:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def norms(c):
    return {
        'BN': lambda: nn.BatchNorm2d(c),
        'GN': lambda: nn.GroupNorm(4, c),
        'CBN': lambda: CrossIterationBatchNorm2d(c, window=4, burnin=0),
        'CBN-avg': lambda: CrossIterationBatchNorm2d(c, window=4, burnin=0, compensate=False),
        'identity': lambda: nn.Identity(),
    }


def _model(kind, shape, device):
    torch.manual_seed(0)
    conv = nn.Conv2d(shape[1], shape[1], 3, padding=1, bias=False)
    return nn.Sequential(conv, norms(shape[1])[kind]()).to(device)


def _step(model, opt, x):
    out = model(x)
    out.square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def count_ops(kind, device, shape=COUNT_SHAPE):
    model = _model(kind, shape, device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(shape, generator=g).to(device) for _ in range(6)]
    for x in xs[:5]:
        _step(model, opt, x)
    counter = OpCounter()
    with counter:
        out = model(xs[5])
        out.square().mean().backward()
    return counter.ops


def time_steps(kinds, device, shape, iters):
    """Median ms per training step of each kind, the kinds interleaved step by step (so that
    drifts of the machine's speed hit all of them alike)."""
    setups = {}
    x = torch.randn(shape, device=device)
    for kind in kinds:
        model = _model(kind, shape, device)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        for _ in range(5):
            _step(model, opt, x)
        setups[kind] = (model, opt)
    times = {k: [] for k in kinds}
    for _ in range(iters):
        for kind, (model, opt) in setups.items():
            if device == 'cuda':
                torch.cuda.synchronize()
            t = time.perf_counter()
            _step(model, opt, x)
            if device == 'cuda':
                torch.cuda.synchronize()
            times[kind].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    ap.add_argument('--iters', type=int, default=200)
    ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--breakdown', action='store_true', help='print CBN ops by name')
    ap.add_argument('--emulate-cuda', action='store_true',
                    help='(CPU) count the CUDA branch through the tests\' kernel emulations')
    ap.add_argument('--matmul-precision', default='highest', choices=['highest', 'high', 'medium'],
                    help="torch.set_float32_matmul_precision for the run ('high': TF32)")
    ap.add_argument('--json')
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_float32_matmul_precision(args.matmul_precision)
    ctx = None
    if args.emulate_cuda:
        from tests.cbn.cuda_emulation import emulated_cuda_kernels
        ctx = emulated_cuda_kernels()
        ctx.__enter__()
    meta = dict(torch=torch.__version__, python=platform.python_version(), machine=platform.machine(),
                threads=args.threads, device=args.device, date=time.strftime('%Y-%m-%d'),
                matmul_precision=args.matmul_precision,
                branch='fused (emulated)' if args.emulate_cuda else
                ('fused' if args.device == 'cuda' else 'portable'))
    if args.device == 'cuda':
        meta['gpu'] = torch.cuda.get_device_name()
    base = count_ops('identity', args.device)
    kinds = ['BN', 'GN', 'CBN', 'CBN-avg']
    result = dict(meta=meta, ops={}, breakdown={}, ms={})
    print(f'# ops per training step beyond conv + loss, and ms per step (median of {args.iters}); {meta}')
    for kind in kinds:
        ops = count_ops(kind, args.device) - base
        result['ops'][kind] = sum(ops.values())
        result['breakdown'][kind] = dict(ops.most_common())
    if ctx is None:
        for shape in SHAPES:
            key = 'x'.join(map(str, shape))
            result['ms'][key] = time_steps(kinds, args.device, shape, args.iters)
    else:
        ctx.__exit__(None, None, None)
    header = f'{"":>12}' + ''.join(f'{k:>16}' for k in kinds)
    print(header)
    print(f'{"ATen ops":>12}' + ''.join(f'{result["ops"][k]:>16d}' for k in kinds))
    for key, row in result['ms'].items():
        bn = row['BN']
        print(f'{key:>12}' + ''.join(f'{row[k]:>9.3f}ms {row[k] / bn:4.2f}x' for k in kinds))
    if args.breakdown:
        for k in ('CBN', 'CBN-avg'):
            print(f'{k} ops: ' + ', '.join(f'{n} {c}' for n, c in result['breakdown'][k].items()))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(result, f, indent=1)


if __name__ == '__main__':
    main()
