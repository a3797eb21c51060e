"""tools/dist_train.sh / dist_test.sh with 2 CPU processes (gloo): CBN under DDP, burn-in in
epochs converted for the actual world size, checkpoint, resume, evaluation."""
import ast
import os.path as osp
import socket
import sys

import pytest

from tests.helpers import QUICKSTART, ROOT, digits_options, make_tiny_digits
from tests.multiproc import run, run_many, run_split

pytestmark = pytest.mark.integration


def _port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return str(s.getsockname()[1])


def _sh(args, path=None, extra_env=None):
    env = dict(PYTHON=sys.executable, PORT=_port(), OMP_NUM_THREADS='1',
               PATH=(path + ':' if path else '') + '/usr/bin:/bin', HOME=osp.expanduser('~'),
               **(extra_env or {}))
    rc, out = run(['bash'] + args, cwd=ROOT, env=env, what=' '.join(args[:1]))
    assert rc == 0, out[-6000:]
    return out


def test_dist_train_resume_and_dist_test(tmp_path):
    data = make_tiny_digits(str(tmp_path / 'digits'), num_train=16, num_val=4)
    work = str(tmp_path / 'work')
    opts = digits_options(data, batch_size=2) + ['default_hooks.checkpoint.interval=1',
                                                 'train_cfg.val_interval=10']
    out = _sh(['tools/dist_train.sh', QUICKSTART, '2', '--work-dir', work, '--cfg-options',
               'train_cfg.max_epochs=1'] + opts)
    assert 'using the gloo backend' in out
    assert f'[cbn_mmdet] using Python {sys.executable}' in out
    assert '`broadcast_buffers` is deprecated' not in out  # no FutureWarning from any process
    # the 1-epoch run never leaves the 1-epoch burn-in: said once (mmengine's logger prints
    # rank 0's warnings)
    assert out.count('have a burn-in of 4 iterations, at least the 4 training iterations') == 1
    # 16 images / (2 per process x 2 processes) = 4 iterations per epoch
    assert 'burn-in 1 epochs = 4 iterations (4 iterations per epoch on each of 2 processes)' in out
    assert osp.isfile(osp.join(work, 'epoch_1.pth'))

    out = _sh(['tools/dist_train.sh', QUICKSTART, '2', '--work-dir', work, '--resume',
               '--cfg-options', 'train_cfg.max_epochs=2'] + opts)
    assert 'resumed epoch: 1, iter: 4' in out
    assert 'at least the' not in out  # 8 iterations now: the window is used
    from cbn_mmdet.engine.checkpoint import needs_safe_loader
    assert f"Loads checkpoint by {'local_safe' if needs_safe_loader() else 'local'} backend" in out
    from cbn_mmdet.engine.checkpoint import load_local_checkpoint
    ckpt = load_local_checkpoint(osp.join(work, 'epoch_2.pth'))
    # past the burn-in: the window (saved beside the state_dict) holds compensated entries
    assert ckpt['state_dict']['neck.fpn_convs.0.bn.cbn_step'].item() == 8
    assert ckpt['cbn_window']['neck.fpn_convs.0.bn']['cbn_valid'].sum().item() == 3

    out = _sh(['tools/dist_test.sh', QUICKSTART, osp.join(work, 'epoch_2.pth'), '2',
               '--work-dir', str(tmp_path / 'test'), '--cfg-options'] + opts)
    metrics = ast.literal_eval(out.strip().splitlines()[-1])
    assert 0.0 <= metrics['coco/bbox_mAP'] <= 1.0 and 0.0 <= metrics['coco/segm_mAP'] <= 1.0


def test_two_nodes_on_one_machine_train_and_resume(tmp_path):
    """The README's multi-node launch (NNODES=2 NODE_RANK=0|1 MASTER_ADDR PORT dist_train.sh),
    as two "nodes" on 127.0.0.1 with one process each (gloo on CPU), started together: they
    train one epoch as a world of 2, save, and resume for a second epoch."""
    data = make_tiny_digits(str(tmp_path / 'digits'), num_train=8, num_val=2)
    work = str(tmp_path / 'work')
    opts = digits_options(data, batch_size=2) + ['default_hooks.checkpoint.interval=1',
                                                 'train_cfg.val_interval=10']

    def nodes(extra):
        port = _port()  # the same free port for both: node 0 serves the rendezvous on it
        envs = [dict(PYTHON=sys.executable, NNODES='2', NODE_RANK=str(rank),
                     MASTER_ADDR='127.0.0.1', PORT=port, OMP_NUM_THREADS='1',
                     PATH='/usr/bin:/bin', HOME=osp.expanduser('~')) for rank in (0, 1)]
        cmd = ['bash', 'tools/dist_train.sh', QUICKSTART, '1', '--work-dir', work] + extra
        results = run_many([cmd, cmd], cwd=ROOT, envs=envs, deadline=300,
                           what=['node 0', 'node 1'])
        for rank, (rc, out) in enumerate(results):
            assert rc == 0, f'node {rank} exited {rc}:\n{out[-6000:]}'
            assert 'using the gloo backend' in out  # each node started its process
        return [out for _, out in results]

    out0, _ = nodes(['--cfg-options', 'train_cfg.max_epochs=1'] + opts)
    assert 'Distributed training: True' in out0 and 'GPU number: 2' in out0  # world size 2
    # 8 images / (2 per process x 2 processes, one per node) = 2 iterations per epoch
    assert 'burn-in 1 epochs = 2 iterations (2 iterations per epoch on each of 2 processes)' in out0
    assert osp.isfile(osp.join(work, 'epoch_1.pth'))

    out0, out1 = nodes(['--resume', '--cfg-options', 'train_cfg.max_epochs=2'] + opts)
    assert 'resumed epoch: 1, iter: 2' in out0
    assert 'resumed at step 2 with the saved windows of 16 layers' in out0
    for out in (out0, out1):  # each node's process loaded the checkpoint
        assert f'backend from path: {osp.join(work, "epoch_1.pth")}' in out
    assert 'Epoch(train) [2][2/2]' in out0
    from cbn_mmdet.engine.checkpoint import load_local_checkpoint
    ckpt = load_local_checkpoint(osp.join(work, 'epoch_2.pth'))
    assert ckpt['meta']['iter'] == 4 and ckpt['state_dict']['neck.fpn_convs.0.bn.cbn_step'].item() == 4


def test_slurm_scripts_with_a_stand_in_srun(tmp_path):
    """tools/slurm_train.sh and slurm_test.sh as written, with tests/fixtures/fake_slurm/srun
    standing in for Slurm (2 tasks on this machine, gloo on CPU)."""
    data = make_tiny_digits(str(tmp_path / 'digits'), num_train=8, num_val=4)
    work = str(tmp_path / 'work')
    opts = digits_options(data, batch_size=2) + ['train_cfg.val_interval=10']
    fake = osp.join(ROOT, 'tests', 'fixtures', 'fake_slurm')
    env = dict(GPUS='2', GPUS_PER_NODE='2', MASTER_PORT=_port())
    out = _sh(['tools/slurm_train.sh', 'partition', 'cbn-test', QUICKSTART, work,
               '--cfg-options', 'train_cfg.max_epochs=1'] + opts, path=fake, extra_env=env)
    assert f'[cbn_mmdet] using Python {sys.executable}' in out  # tools/_python.sh picked it
    assert 'burn-in 1 epochs = 2 iterations (2 iterations per epoch on each of 2 processes)' in out
    assert osp.isfile(osp.join(work, 'epoch_1.pth'))
    env['MASTER_PORT'] = _port()
    out = _sh(['tools/slurm_test.sh', 'partition', 'cbn-test', QUICKSTART,
               osp.join(work, 'epoch_1.pth'), '--work-dir', str(tmp_path / 'test'),
               '--cfg-options'] + opts, path=fake, extra_env=env)
    assert f'[cbn_mmdet] using Python {sys.executable}' in out
    assert "'coco/bbox_mAP'" in out


@pytest.mark.parametrize('script,args', [
    ('dist_train.sh', [QUICKSTART, 'x', '1']), ('dist_test.sh', [QUICKSTART, 'x', '1']),
    ('slurm_train.sh', ['partition', 'job', QUICKSTART, 'work']),
    ('slurm_test.sh', ['partition', 'job', QUICKSTART, 'x.pth'])])
def test_launch_scripts_refuse_a_python_without_torch_in_one_line(script, args, tmp_path):
    """Every launch script picks its Python with tools/_python.sh (the same one-line refusal;
    the Slurm ones never reach srun, which is not on this PATH)."""
    fake = tmp_path / 'python'
    fake.write_text('#!/bin/sh\necho "No module named torch" >&2\nexit 1\n')
    fake.chmod(0o755)
    rc, out, err = run_split(['bash', f'tools/{script}'] + args, cwd=ROOT,
                             env=dict(PYTHON=str(fake), PATH='/usr/bin:/bin'), deadline=60)
    assert rc == 1 and out == ''
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f'{fake} cannot import torch' in lines[0] and 'PYTHON=' in lines[0]
