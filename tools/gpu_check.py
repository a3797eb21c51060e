"""Every GPU check of the project in one command, with a pass/fail table and the figures.

    python tools/gpu_check.py [--out DIR] [--quick]

On one CUDA GPU (estimated 5-6 minutes on an H100-class GPU, not yet timed; ``--quick`` for fewer
iterations):
  1. the whole CBN test matrix (``tests/cbn``) with real CUDA in it: every test of the
     ``kernel_set`` matrix also runs with CUDA as the default device (reference comparisons over
     SGD steps, channels_last, autocast, robustness), the tests marked ``cuda`` run the CUDA
     branch against the CPU float64 path, a training step under
     ``torch.cuda.set_sync_debug_mode('error')``, and TF32 left at the user's defaults;
  2. ``tools/benchmarks/op_count_bench.py --device cuda``: ATen ops per training step (targets:
     CBN <= 50, plain averaging <= 35) and time per step at small shapes;
  3. ``tools/benchmarks/layer_bench.py --device cuda``: conv+CBN vs the floor (BN + one extra
     weight-gradient conv) at the FPN and box-head shapes; target CBN <= 1.1x the floor;
  4. ``tools/benchmarks/detector_bench.py --device cuda``: Faster/Mask R-CNN R50-FPN train step
     at 2 images of 800x1216; target CBN <= 1.1x the GN config;
  5. ``tools/benchmarks/memory_bench.py --device cuda --size 800 1333``: per config of
     ``configs/cbn/``, what the CBN layers keep (target <= 1.10x the stored window) and the peak
     memory of a training step at the config's per-GPU batch (``torch.cuda.max_memory_allocated``).
Raw outputs and JSON go to ``--out`` (default ``work_dirs/gpu_check``). Exits 1 if a check fails.
Without a GPU it says so and exits 2 (``--allow-cpu`` runs the same steps on CPU, to test this
script itself).
"""
import argparse
import json
import os
import os.path as osp
import subprocess
import sys
import time

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def run(name, args, out_dir, timeout):
    """Run a command, keep its output in ``out_dir/name.txt``; (returncode, seconds, text)."""
    t = time.time()
    try:
        proc = subprocess.run(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=timeout)
        rc, text = proc.returncode, proc.stdout
    except subprocess.TimeoutExpired as e:
        rc, text = 124, (e.stdout or '') if isinstance(e.stdout, str) else ''
        text += f'\n[gpu_check] timed out after {timeout} s'
    with open(osp.join(out_dir, f'{name}.txt'), 'w') as f:
        f.write(text)
    return rc, time.time() - t, text


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--out', default=osp.join(ROOT, 'work_dirs', 'gpu_check'))
    p.add_argument('--quick', action='store_true', help='fewer benchmark iterations')
    p.add_argument('--allow-cpu', action='store_true', help='run on CPU (tests this script)')
    a = p.parse_args(argv)
    import torch
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if device == 'cpu' and not a.allow_cpu:
        print('[gpu_check] no CUDA device: nothing to check (use --allow-cpu to test the script)')
        return 2
    os.makedirs(a.out, exist_ok=True)
    py = sys.executable
    env = dict(python=sys.version.split()[0], torch=torch.__version__, device=device,
               gpu=torch.cuda.get_device_name() if device == 'cuda' else None,
               date=time.strftime('%Y-%m-%d %H:%M'))
    print(f'[gpu_check] {env}')
    rows = []  # (check, figure, target, ok)

    rc, secs, text = run('pytest', [py, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
                                    'tests/cbn'], a.out, 1500)
    summary = [line for line in text.splitlines() if ' passed' in line or ' failed' in line]
    skipped_cuda = device == 'cuda' and ' skipped' in (summary[-1] if summary else '')
    rows.append(('tests/cbn incl. cuda tests', summary[-1] if summary else f'exit {rc}',
                 'all pass, none skipped', rc == 0 and not skipped_cuda))

    it = ['--iters', '30'] if a.quick else []
    ops_json = osp.join(a.out, 'op_count.json')
    rc, secs, _ = run('op_count', [py, 'tools/benchmarks/op_count_bench.py', '--device', device,
                                   '--json', ops_json] + (['--iters', '50'] if a.quick else []),
                      a.out, 600)
    res = load(ops_json)
    if rc == 0 and res:
        rows.append(('ATen ops per step, CBN', str(res['ops']['CBN']), '<= 50', res['ops']['CBN'] <= 50))
        rows.append(('ATen ops per step, plain avg', str(res['ops']['CBN-avg']), '<= 35',
                     res['ops']['CBN-avg'] <= 35))
        for shape, ms in res['ms'].items():
            rows.append((f'step time {shape} CBN / BN', f"{ms['CBN'] / ms['BN']:.2f}x "
                         f"({ms['CBN']:.3f} ms)", 'report', True))
    else:
        rows.append(('op_count_bench', f'exit {rc}', 'runs', False))

    layer_json = osp.join(a.out, 'layer.json')
    shapes = 'all' if device == 'cuda' else 'cpu'
    rc, secs, _ = run('layer_bench', [py, 'tools/benchmarks/layer_bench.py', '--device', device,
                                      '--shapes', shapes, '--json', layer_json] + it, a.out, 900)
    res = load(layer_json)
    if rc == 0 and res:
        by = {}
        for r in res['rows']:
            by.setdefault('x'.join(map(str, r['shape'])), {})[r['norm']] = r
        for shape, norms in by.items():
            ratio = norms['CBN']['ms'] / norms['floor']['ms']
            rows.append((f'layer {shape} CBN / floor', f'{ratio:.2f}x', '<= 1.10', ratio <= 1.10))
            if norms['CBN'].get('peak_mib') is not None:
                mem = norms['CBN']['peak_mib'] / norms['BN']['peak_mib']
                rows.append((f'layer {shape} CBN / BN memory', f'{mem:.2f}x', 'report', True))
    else:
        rows.append(('layer_bench', f'exit {rc}', 'runs', False))

    det_json = osp.join(a.out, 'detector.json')
    rc, secs, _ = run('detector_bench', [py, 'tools/benchmarks/detector_bench.py', '--device',
                                         device, '--json', det_json]
                      + (['--iters', '10', '--warmup', '3'] if a.quick else []), a.out, 1200)
    res = load(det_json)
    if rc == 0 and res:
        for det in ('faster-rcnn', 'mask-rcnn'):
            ms = {r['norm']: r['ms'] for r in res['rows'] if r['detector'] == det}
            ratio = ms['cbn'] / ms['gn']
            rows.append((f'{det} step CBN / GN', f"{ratio:.2f}x ({ms['cbn']:.1f} ms)", '<= 1.10',
                         ratio <= 1.10))
    else:
        rows.append(('detector_bench', f'exit {rc}', 'runs', False))

    mem_json = osp.join(a.out, 'memory.json')
    size = ['800', '1333'] if device == 'cuda' else ['128', '128']
    configs = [] if device == 'cuda' else [osp.join(ROOT, 'configs/cbn', c) for c in (
        'faster-rcnn_r50_fpn_cbn_4xb4-1x_coco.py', 'faster-rcnn_r50_fpn_bn_4xb4-1x_coco.py')]
    rc, secs, _ = run('memory_bench', [py, 'tools/benchmarks/memory_bench.py', *configs,
                                       '--device', device, '--size', *size, '--json', mem_json],
                      a.out, 900)
    res = load(mem_json)
    if rc == 0 and res:
        for r in res:
            name = r['config'][:-3]
            if r['kept_ratio'] is not None:
                rows.append((f'{name} kept/window', f"{r['kept_ratio']:.3f}", '<= 1.10',
                             r['kept_ratio'] <= 1.10))
            if r.get('peak_step_mib') is not None:
                rows.append((f"{name} peak step ({r['images']} img)",
                             f"{r['peak_step_mib']:.0f} MiB", 'report', True))
    else:
        rows.append(('memory_bench', f'exit {rc}', 'runs', False))

    width = max(len(r[0]) for r in rows)
    print(f"\n{'check':<{width}}  {'figure':<28} {'target':<24} result")
    for name, fig, target, ok in rows:
        print(f"{name:<{width}}  {fig:<28} {target:<24} {'PASS' if ok else 'FAIL'}")
    with open(osp.join(a.out, 'summary.json'), 'w') as f:
        json.dump(dict(environment=env, checks=[dict(check=n, figure=fg, target=t, ok=o)
                                                for n, fg, t, o in rows]), f, indent=1)
    return 0 if all(r[3] for r in rows) else 1


if __name__ == '__main__':
    sys.exit(main())
