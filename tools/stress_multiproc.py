"""Run multi-process tests again and again and count hangs and aborts (teardown faults are
intermittent: one green run proves little).

    python tools/stress_multiproc.py --repeat 30 --out results/multiproc_stress/NAME.jsonl \
        [--repo DIR] [--deadline 600] [NODE_ID ...]

Each repetition is one ``python -m pytest -q NODE_IDS`` in ``--repo`` (default: this
repository) with this interpreter, under an outer deadline of its own (so that a test suite
without deadlines is measured too). A repetition is classified as ``pass``, ``fail``, ``hang``
(killed at the deadline, or a test failed by its own deadline), or ``abort`` (a process
aborted: "terminate called", "Aborted", a signal exit status). One JSON line per repetition;
the summary goes to stdout.
"""
import argparse
import json
import os
import os.path as osp
import signal
import subprocess
import sys
import time

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
DEFAULT_NODES = [
    'tests/cbn/test_sync.py',
    'tests/engine/test_precise_stats.py::test_two_processes_all_reduce_to_the_big_batch',
]
ABORT_SIGNS = ('terminate called', 'Aborted', 'core dumped', 'died with <Signals',
               'exited with exit code -', 'SIGABRT', 'SIGSEGV')


def classify(rc, out, timed_out):
    if timed_out or 'did not finish in' in out:
        return 'hang'
    if any(s in out for s in ABORT_SIGNS) or (rc is not None and rc < 0):
        return 'abort'
    return 'pass' if rc == 0 else 'fail'


def once(repo, nodes, deadline):
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider']
                            + nodes, cwd=repo, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=deadline)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        timed_out = True
    return proc.returncode, out, timed_out, time.monotonic() - start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('nodes', nargs='*', default=DEFAULT_NODES)
    p.add_argument('--repeat', type=int, default=30)
    p.add_argument('--repo', default=ROOT)
    p.add_argument('--deadline', type=float, default=600)
    p.add_argument('--out', required=True)
    args = p.parse_args(argv)
    os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
    counts = {}
    with open(args.out, 'a') as f:
        for i in range(args.repeat):
            rc, out, timed_out, secs = once(args.repo, args.nodes, args.deadline)
            kind = classify(rc, out, timed_out)
            counts[kind] = counts.get(kind, 0) + 1
            tail = out.strip().splitlines()[-1] if out.strip() else ''
            row = dict(rep=i, result=kind, rc=rc, seconds=round(secs, 1), last_line=tail,
                       torch=subprocess.getoutput(f'{sys.executable} -c "import torch; '
                                                  f'print(torch.__version__)"') if i == 0 else None)
            if kind != 'pass':
                row['output_tail'] = out[-3000:]
            f.write(json.dumps(row) + '\n')
            f.flush()
            print(f'[{i + 1}/{args.repeat}] {kind} in {secs:.0f} s: {tail}', flush=True)
    print(json.dumps(dict(repeat=args.repeat, nodes=args.nodes, repo=args.repo, **counts)))


if __name__ == '__main__':
    main()
