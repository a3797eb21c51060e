"""SyncCBN over 2 processes (gloo, CPU) equals single-process CBN on the whole batch."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.utils.checkpoint as cp

from cbn_mmdet.cbn import CrossIterationBatchNorm2d, SyncCrossIterationBatchNorm2d
from tests.multiproc import end_distributed, phase, spawn

# Per step: how the 4 images of the batch are split between rank 0 and rank 1.
SPLITS = [(2, 2), (3, 1), (4, 0), (1, 3), (2, 2), (0, 4)]
LR = 0.1


def _data(step):
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(4, 3, 8, 8, generator=g, dtype=torch.float64), \
        torch.randn(4, 6, 8, 8, generator=g, dtype=torch.float64)


def _model(norm_cls, **norm_kw):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), norm_cls(6, **(norm_kw or dict(window=3)))).double()


class _Checkpointed(nn.Module):
    """``net`` run under ``torch.utils.checkpoint`` (recomputed in backward)."""

    def __init__(self, net, reentrant):
        super().__init__()
        self.net, self.reentrant = net, reentrant

    def forward(self, x):
        return cp.checkpoint(self.net, x, use_reentrant=self.reentrant)


def _worker(rank, world, port, out_dir, fused=False, splits=SPLITS, norm_kw=None, reentrant=None):
    if fused:  # the CUDA branch, through CPU emulations of the fused kernels
        from tests.cbn.cuda_emulation import emulated_cuda_kernels
        with emulated_cuda_kernels():
            return _worker(rank, world, port, out_dir, False, splits, norm_kw, reentrant)
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    phase('init_process_group')
    dist.init_process_group('gloo', rank=rank, world_size=world)
    torch.set_num_threads(1)
    net = _model(SyncCrossIterationBatchNorm2d, **(norm_kw or {}))
    model = nn.parallel.DistributedDataParallel(
        net if reentrant is None else _Checkpointed(net, reentrant))
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    records = []
    for step, split in enumerate(splits):
        phase(f'training step {step}')
        x, target = _data(step)
        lo = 0 if rank == 0 else split[0]
        hi = split[0] if rank == 0 else sum(split)
        xr = x[lo:hi].clone().requires_grad_()
        out = model(xr)
        opt.zero_grad()
        (out * target[lo:hi]).sum().backward()  # DDP averages the weight gradients
        records.append(dict(out=out.detach(), xgrad=xr.grad,
                            grads=[p.grad.clone() for p in model.parameters()]))
        opt.step()
    phase('writing results')
    torch.save(dict(records=records, state=net.state_dict(),
                    window=net[1].window_state()), os.path.join(out_dir, f'rank{rank}.pt'))
    end_distributed()


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _compare_with_one_process(ranks, model, splits=SPLITS):
    """Train ``model`` on the whole batch of every step and compare each step's output, input
    gradient and (DDP-averaged, so halved) parameter gradients with the two ranks' records."""
    opt = torch.optim.SGD(model.parameters(), lr=LR / 2)  # DDP's average is half the sum
    for step, split in enumerate(splits):
        x, target = _data(step)
        x = x.clone().requires_grad_()
        out = model(x)
        opt.zero_grad()
        (out * target).sum().backward()
        r0, r1 = ranks[0]['records'][step], ranks[1]['records'][step]
        torch.testing.assert_close(torch.cat([r0['out'], r1['out']]), out.detach())
        torch.testing.assert_close(torch.cat([r0['xgrad'], r1['xgrad']]), x.grad)
        for g0, g1, p in zip(r0['grads'], r1['grads'], model.parameters()):
            torch.testing.assert_close(g0, g1)  # DDP: the same averaged gradient on each rank
            torch.testing.assert_close(2 * g0, p.grad)
        opt.step()


@pytest.mark.integration
@pytest.mark.parametrize('fused', [False, True], ids=['portable', 'fused-emulated'])
def test_sync_cbn_two_processes_equals_one_process_on_the_whole_batch(tmp_path, fused):
    spawn(_worker, args=(2, _free_port(), str(tmp_path), fused))
    ranks = [torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in range(2)]

    model = _model(CrossIterationBatchNorm2d)
    _compare_with_one_process(ranks, model)
    # every rank ends with the same state and window as the single process
    for key, value in model[1].state_dict().items():
        torch.testing.assert_close(ranks[0]['state'][f'1.{key}'], value)
        torch.testing.assert_close(ranks[1]['state'][f'1.{key}'], value)
    for key, value in model[1].window_state().items():
        assert value.numel() > 0, key
        torch.testing.assert_close(ranks[0]['window'][key], value)
        torch.testing.assert_close(ranks[1]['window'][key], value)


@pytest.mark.integration
@pytest.mark.parametrize('norm_kw', [dict(window=1), dict(window=3, burnin=100)],
                         ids=['window-1', 'burn-in'])
@pytest.mark.parametrize('fused', [False, True], ids=['portable', 'fused-emulated'])
def test_sync_cbn_as_sync_bn_equals_batchnorm_on_the_whole_batch(tmp_path, fused, norm_kw):
    """Window 1 and burn-in: synchronized BN. Outputs, gradients and running statistics equal
    BatchNorm2d on the whole batch (uneven and empty per-process splits included)."""
    spawn(_worker, args=(2, _free_port(), str(tmp_path), fused, SPLITS, norm_kw))
    ranks = [torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in range(2)]
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)).double()
    model.load_state_dict({k: v for k, v in _model(CrossIterationBatchNorm2d).state_dict().items()
                           if k in model.state_dict()})
    _compare_with_one_process(ranks, model)
    for r in range(2):
        for key in ('running_mean', 'running_var', 'num_batches_tracked'):
            torch.testing.assert_close(ranks[r]['state'][f'1.{key}'], model[1].state_dict()[key])


def test_sync_cbn_without_process_group_is_cbn():
    a, b = _model(CrossIterationBatchNorm2d), _model(SyncCrossIterationBatchNorm2d)
    for step in range(4):
        x, target = _data(step)
        for m in (a, b):
            (m(x) * target).sum().backward()
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb
        torch.testing.assert_close(va, vb)


@pytest.mark.integration
@pytest.mark.parametrize('fused', [False, True], ids=['portable', 'fused-emulated'])
def test_sync_cbn_step_with_every_process_empty(tmp_path, fused):
    """A step where no process has an element: nothing divides by the zero count, the step is
    kept out of the window and the running statistics, training goes on."""
    splits = [(2, 2), (1, 1), (2, 1), (0, 0), (1, 2)]  # the empty step's slot is still held
    spawn(_worker, args=(2, _free_port(), str(tmp_path), fused, splits))
    for r in range(2):
        saved = torch.load(tmp_path / f'rank{r}.pt', weights_only=True)
        state, window = saved['state'], saved['window']
        for key in ('cbn_mu', 'cbn_nu', 'cbn_wnu', 'cbn_dnu', 'cbn_dmu'):
            assert torch.isfinite(window[key]).all(), key
        for key in ('1.running_mean', '1.running_var'):
            assert torch.isfinite(state[key]).all(), key
        assert state['1.cbn_skipped'].item() == 1
        assert window['cbn_valid'].sum().item() == 1
        assert saved['records'][3]['out'].shape == (0, 6, 8, 8)
        for rec in saved['records']:
            assert torch.isfinite(rec['out']).all() and all(torch.isfinite(g).all() for g in rec['grads'])


@pytest.mark.integration
@pytest.mark.parametrize('reentrant', [True, False])
def test_sync_cbn_under_activation_checkpointing_equals_one_process(tmp_path, reentrant):
    """SyncCBN inside ``torch.utils.checkpoint`` on 2 processes: the derivatives deferred to
    the recomputation are averaged over the processes there, so each step equals single-process
    CBN (no checkpointing) on the whole batch, compensated window included."""
    splits = [(2, 2), (3, 1), (1, 3), (2, 2), (3, 1)]
    norm_kw = dict(window=3, burnin=1)
    spawn(_worker, args=(2, _free_port(), str(tmp_path), False, splits, norm_kw, reentrant))
    ranks = [torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in range(2)]
    model = _model(CrossIterationBatchNorm2d, **norm_kw)
    _compare_with_one_process(ranks, model, splits)
    window = model[1].window_state()
    assert window['cbn_dnu'].abs().sum() > 0
    for key, value in window.items():
        for r in ranks:
            torch.testing.assert_close(r['window'][key], value, msg=key)
