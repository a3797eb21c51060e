"""Precise population statistics: the estimate against one big batch, over 2 processes, and
the training state it must leave alone."""
import copy
import os
import random
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from cbn_mmdet.cbn import CrossIterationBatchNorm2d
from cbn_mmdet.engine import precise_stats
from cbn_mmdet.engine.precise_stats import recompute_precise_stats, trained_bn_layers
from tests.multiproc import end_distributed, phase, spawn

F64 = torch.float64
SIZES = [3, 1, 5, 2, 4]  # uneven batches


class _Branches(nn.Module):
    """Three branches on the input (so each norm's input does not depend on another norm):
    BatchNorm2d, CBN (windowed) and a BN frozen in eval mode (norm_eval)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv_bn, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv_cbn, self.cbn = nn.Conv2d(3, 5, 3, stride=2), CrossIterationBatchNorm2d(5, window=3)
        self.conv_frozen, self.frozen = nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2)
        self.double()

    def train(self, mode=True):
        super().train(mode)
        self.frozen.eval()  # as mmdet's norm_eval does
        return self

    def forward(self, x):
        return (self.bn(self.conv_bn(x)).mean() + self.cbn(self.conv_cbn(x)).mean()
                + self.frozen(self.conv_frozen(x)).mean())


def _images(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 9, 9, generator=g, dtype=F64) * 2 + 0.5


def _batches(images, sizes):
    out, i = [], 0
    for s in sizes:
        out.append(images[i:i + s])
        i += s
    return out


def _train(model, steps=4):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(steps):
        opt.zero_grad()
        model(_images(2, 100 + step)).backward()
        opt.step()


def _expected(model, images):
    """Mean and unbiased variance of each trained norm's input over all images at once."""
    with torch.no_grad():
        out = {}
        for conv, norm in ((model.conv_bn, 'bn'), (model.conv_cbn, 'cbn')):
            y = conv(images)
            out[norm] = (y.mean((0, 2, 3)), y.transpose(0, 1).reshape(y.shape[1], -1).var(1))
        return out


def _forward(model, batch):
    model(batch)


def test_estimate_equals_one_big_batch_and_leaves_training_state():
    model = _Branches()
    _train(model)
    model.eval()  # the hook must put it in train mode itself and restore eval
    frozen = copy.deepcopy(model.frozen.state_dict())
    cbn_state = {k: v.clone() for k, v in model.cbn.state_dict().items()
                 if k not in ('running_mean', 'running_var')}
    images = _images(sum(SIZES), 7)
    rng = torch.get_rng_state()
    info = recompute_precise_stats(model, _batches(images, SIZES), _forward, num_images=15)
    assert info['layers'] == 2 and info['images'] == 15 and not model.training
    assert torch.equal(torch.get_rng_state(), rng)
    for name, (mean, var) in _expected(model, images).items():
        layer = getattr(model, name)
        torch.testing.assert_close(layer.running_mean, mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(layer.running_var, var, rtol=1e-10, atol=1e-12)
    for k, v in model.frozen.state_dict().items():  # norm_eval layer untouched
        assert torch.equal(v, frozen[k]), k
    for k, v in model.cbn.state_dict().items():  # window, step, burn-in counters untouched
        if k in cbn_state:
            assert torch.equal(v, cbn_state[k]), k
    assert [n for n, _ in trained_bn_layers(model)] == ['bn', 'cbn']


def test_num_images_stops_the_pass_and_bad_values_are_refused():
    model = _Branches()
    images = _images(sum(SIZES), 7)
    info = recompute_precise_stats(model, _batches(images, SIZES), _forward, num_images=4)
    assert info['images'] == 4  # batches of 3 and 1
    mean, var = _expected(model, images[:4])['bn']
    torch.testing.assert_close(model.bn.running_var, var, rtol=1e-10, atol=1e-12)
    for bad in (0, -5, 2.5, True, '100'):
        with pytest.raises(ValueError, match='`num_images` must be an integer >= 1'):
            recompute_precise_stats(model, [], _forward, num_images=bad)


def test_training_continues_exactly_as_without_the_pass():
    """The pass changes running statistics only: later training steps (outputs, gradients,
    the CBN window) are identical to a copy that never ran it."""
    a = _Branches()
    _train(a, 3)
    b = copy.deepcopy(a)
    recompute_precise_stats(a, _batches(_images(9, 1), [4, 5]), _forward, num_images=9)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.05)
    opt_b = torch.optim.SGD(b.parameters(), lr=0.05)
    for step in range(4):
        x = _images(2, 50 + step)
        for m, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            m(x).backward()
            opt.step()
        for pa, pb in zip(a.parameters(), b.parameters()):
            assert torch.equal(pa, pb)
    for k, v in a.cbn.state_dict().items():
        if k not in ('running_mean', 'running_var'):
            assert torch.equal(v, b.cbn.state_dict()[k]), k


def _conv_bn_conv_bn(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4),
                         nn.Conv2d(4, 5, 3), nn.BatchNorm2d(5)).double()


def test_layers_without_running_statistics_are_not_selected():
    """A BN built with ``track_running_stats=False`` has no running statistics to set: it is
    neither selected nor counted, its forward is not replaced and its state is untouched."""
    model = _conv_bn_conv_bn(5)
    model[3] = nn.BatchNorm2d(5, track_running_stats=False).double()
    untracked = copy.deepcopy(model[3].state_dict())
    assert [n for n, _ in trained_bn_layers(model)] == ['1']
    info = recompute_precise_stats(model, _batches(_images(9, 4), [4, 5]), _forward, num_images=9)
    assert info['layers'] == 1 and info['images'] == 9
    assert model[3].running_mean is None and model[3].running_var is None
    assert 'forward' not in vars(model[3])  # the class's forward again (batch statistics)
    assert model[3].state_dict().keys() == untracked.keys()
    for k, v in model[3].state_dict().items():
        assert torch.equal(v, untracked[k]), k


def _noisy_forward(model, batch):
    """A training forward that draws from every RNG a pipeline and model may use: a python
    ``random`` flip, a numpy ``random`` scale and torch's CPU generator (dropout)."""
    if random.random() < 0.5:
        batch = batch.flip(3)
    batch = batch * float(np.random.uniform(0.8, 1.2))
    model(nn.functional.dropout(batch, 0.2, training=True))


def _draws():
    return random.random(), np.random.rand(3).tolist(), torch.rand(3)


def _seed_all(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def test_rng_states_are_restored_after_a_pass_that_draws_from_them():
    """The pass draws from python's, numpy's and torch's CPU RNGs; afterwards each one's next
    draws equal those of a run without the pass (training's sampling/augmentation unchanged)."""
    model = _conv_bn_conv_bn(8)
    batches = _batches(_images(9, 3), [2, 3, 4])
    _seed_all(11)
    expected = _draws()
    _seed_all(11)
    recompute_precise_stats(model, batches, _noisy_forward, num_images=9)
    got = _draws()
    assert got[0] == expected[0], 'python random'
    assert got[1] == expected[1], 'numpy random'
    assert torch.equal(got[2], expected[2]), 'torch CPU generator'
    _seed_all(11)  # the pass did draw: without the restore the next draws would differ
    _noisy_forward(model, batches[0])
    assert _draws()[0] != expected[0]


def test_each_layer_normalizes_with_its_batch_statistics_during_the_pass():
    """conv-BN-conv-BN whose running statistics are far from the data's: both estimates equal
    an independent train-mode run (each BN's inputs gathered by a forward pre-hook), so the
    second BN's depends on the first normalizing with batch, not running, statistics."""
    model = _conv_bn_conv_bn(6)
    with torch.no_grad():
        for bn in (model[1], model[3]):
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.uniform_(-1.0, 1.0)
            bn.running_mean.fill_(3.0)
            bn.running_var.fill_(0.05)
    reference = copy.deepcopy(model).train()
    inputs = {1: [], 3: []}
    for i, seen in inputs.items():
        reference[i].register_forward_pre_hook(lambda m, args, seen=seen: seen.append(args[0]))
    batches = _batches(_images(9, 2), [4, 5])
    with torch.no_grad():
        for batch in batches:
            reference(batch)  # plain BatchNorm2d in training: batch statistics
    model.eval()
    info = recompute_precise_stats(model, batches, _forward, num_images=9)
    assert info['layers'] == 2
    for i, seen in inputs.items():
        y = torch.cat(seen)
        mean, var = y.mean((0, 2, 3)), y.transpose(0, 1).reshape(y.shape[1], -1).var(1)
        for what, want in (('mean', mean), ('var', var)):
            torch.testing.assert_close(getattr(model[i], f'running_{what}'), want, rtol=1e-10,
                                       atol=1e-12, msg=f'BN {i} {what}')


def test_hook_sets_precise_statistics_after_the_last_epoch_in_a_runner(tmp_path, monkeypatch):
    """A real mmengine Runner, 2 epochs, no validation (so only ``after_train_epoch`` can run the
    hook): it runs once, after the last epoch, and that epoch's checkpoint holds the population
    statistics of the final weights rather than the running average."""
    from mmengine.model import BaseModel
    from mmengine.runner import Runner

    from cbn_mmdet.engine.checkpoint import load_local_checkpoint

    class Data(torch.utils.data.Dataset):
        images = _images(8, 21)

        def __len__(self):
            return len(self.images)

        def __getitem__(self, i):
            return dict(inputs=self.images[i])

    class Model(BaseModel):
        def __init__(self):
            super().__init__()
            torch.manual_seed(4)
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
            self.double()

        def forward(self, inputs, data_samples=None, mode='tensor'):
            y = self.bn(self.conv(inputs))
            return dict(loss=(y - 1).square().mean()) if mode == 'loss' else y

    calls, recompute = [], precise_stats.precise_stats_for_runner

    def counted(runner, num_images):
        calls.append((runner.epoch, runner.iter))
        return recompute(runner, num_images)
    monkeypatch.setattr(precise_stats, 'precise_stats_for_runner', counted)
    runner = Runner(
        model=Model(), work_dir=str(tmp_path),
        train_dataloader=dict(dataset=Data(), batch_size=2, num_workers=0,
                              sampler=dict(type='DefaultSampler', shuffle=False),
                              collate_fn=dict(type='default_collate')),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1)),
        train_cfg=dict(by_epoch=True, max_epochs=2),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=1)),
        custom_hooks=[dict(type='PreciseStatsHook', num_images=8)])
    runner.train()
    state = load_local_checkpoint(str(tmp_path / 'epoch_2.pth'))['state_dict']
    with torch.no_grad():
        y = nn.functional.conv2d(Data.images, state['conv.weight'], state['conv.bias'])
    mean, var = y.mean((0, 2, 3)), y.transpose(0, 1).reshape(4, -1).var(1)
    torch.testing.assert_close(state['bn.running_mean'], mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(state['bn.running_var'], var, rtol=1e-10, atol=1e-12)
    assert calls == [(1, 8)]  # after the second (last) epoch's 8th iteration only


def _worker(rank, port, out):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    phase('init_process_group')
    dist.init_process_group('gloo', rank=rank, world_size=2)
    torch.set_num_threads(1)
    phase('precise statistics')
    model = _Branches()
    images = _images(sum(SIZES), 7)
    mine = images[:6] if rank == 0 else images[6:]  # 6 and 9 images, uneven batches
    sizes = [4, 2] if rank == 0 else [1, 5, 3]
    recompute_precise_stats(model, _batches(mine, sizes), _forward, num_images=100)
    phase('writing results')
    torch.save({k: v for k, v in model.state_dict().items() if 'running' in k},
               os.path.join(out, f'rank{rank}.pt'))
    end_distributed()


@pytest.mark.integration
def test_two_processes_all_reduce_to_the_big_batch(tmp_path):
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    spawn(_worker, args=(port, str(tmp_path)))
    model = _Branches()
    expected = _expected(model, _images(sum(SIZES), 7))
    for r in range(2):
        state = torch.load(tmp_path / f'rank{r}.pt', weights_only=True)
        for name, (mean, var) in expected.items():
            torch.testing.assert_close(state[f'{name}.running_mean'], mean, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(state[f'{name}.running_var'], var, rtol=1e-10, atol=1e-12)


@pytest.mark.integration
def test_hook_through_train_then_tool_then_test(tmp_path):
    """A config line (custom_hooks) through tools/train.py; tools/precise_stats.py on a
    checkpoint trained without the hook; tools/test.py on the result."""
    from tests.helpers import digits_config, make_tiny_digits, run_tool
    data = make_tiny_digits(str(tmp_path / 'digits'), num_train=8, num_val=4)
    base = 'configs/cbn/faster-rcnn_r50_fpn_cbn-precise_4xb1-1x_coco.py'
    hooks = [dict(type='CBNHook', burnin_epochs=0.5), dict(type='PreciseStatsHook', num_images=6)]
    with_hook = digits_config(base, data, str(tmp_path / 'a.py'), False, batch_size=2,
                              extra={'custom_hooks': hooks})
    out = run_tool(['tools/train.py', with_hook, '--work-dir', str(tmp_path / 'a')])
    assert 'PreciseStatsHook: population statistics of 12 BatchNorm-family layers from 6 ' \
           'training images per process x 1 processes' in out

    without = digits_config(base, data, str(tmp_path / 'b.py'), False, batch_size=2,
                            extra={'custom_hooks': hooks[:1]})
    run_tool(['tools/train.py', without, '--work-dir', str(tmp_path / 'b')])
    ckpt = str(tmp_path / 'b' / 'epoch_1.pth')
    out = run_tool(['tools/precise_stats.py', without, ckpt, '--num-images', '4',
                    '--work-dir', str(tmp_path / 'c')])
    assert 'precise statistics of 12 layers written to' in out
    from cbn_mmdet.engine.checkpoint import load_local_checkpoint
    old = load_local_checkpoint(ckpt)['state_dict']
    new = load_local_checkpoint(ckpt.replace('.pth', '_precise.pth'))['state_dict']
    changed = [k for k in old if not torch.equal(old[k], new[k])]
    assert changed and all(k.endswith(('running_mean', 'running_var')) for k in changed)
    assert any(k.startswith('neck.') for k in changed) and any('bbox_head' in k for k in changed)
    out = run_tool(['tools/test.py', without, ckpt.replace('.pth', '_precise.pth'),
                    '--work-dir', str(tmp_path / 'd')])
    assert 'Epoch(test) [1/1]' in out  # evaluated (an 8-iteration model detects nothing yet)
