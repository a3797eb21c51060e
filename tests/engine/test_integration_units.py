"""CBNHook's burn-in conversion, the sync_bn guard and the checkpoint loader's allowlist."""
import inspect
import logging

import pytest
import torch
import torch.nn as nn

import cbn_mmdet  # noqa: F401  installs the loader and the guard
from cbn_mmdet.cbn import CrossIterationBatchNorm2d
from cbn_mmdet.engine import CBNHook, CBNSyncBNError, burnin_iterations, load_local_checkpoint


class _FakeRunner:
    def __init__(self, model, iters_per_epoch, world_size, epochs=12):
        self.model = model
        self.train_dataloader = range(iters_per_epoch)
        self.world_size = world_size
        self.max_iters = epochs * iters_per_epoch
        self.logger = logging.getLogger('fake-runner')


def _cbn_model():
    return nn.Sequential(nn.Conv2d(3, 4, 3), CrossIterationBatchNorm2d(4),
                         nn.Sequential(nn.Conv2d(4, 4, 1), CrossIterationBatchNorm2d(4)),
                         nn.Conv2d(4, 4, 1), CrossIterationBatchNorm2d(4, window=1))


def test_hook_warns_once_when_the_burnin_covers_the_whole_run(caplog):
    """A shortened run (1 epoch of 8 iterations) against the 8-epoch burn-in: one warning that
    names the layers and both numbers; the window-1 layer (plain BN anyway) is not named."""
    model = _cbn_model()
    with caplog.at_level(logging.WARNING, logger='fake-runner'):
        CBNHook(burnin_epochs=8).before_train(_FakeRunner(model, 8, 1, epochs=1))
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1, warned
    msg = warned[0]
    assert '2 of 3 CBN layers (1, 2.1)' in msg and 'burn-in of 64 iterations' in msg
    assert '8 training iterations' in msg and 'never use their window' in msg
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger='fake-runner'):  # 12 epochs: 96 > 64
        CBNHook(burnin_epochs=8).before_train(_FakeRunner(_cbn_model(), 8, 1, epochs=12))
        CBNHook(burnin_epochs=8).before_train(_FakeRunner(_cbn_model(), 8, 1, epochs=8))
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and '64 training iterations' in warned[0]  # equal: still never used


def test_first_lr_step_is_the_earliest_over_several_schedulers():
    """Two MultiStep schedulers (lr and momentum, say) with different first milestones: the
    window starts at the earliest one."""
    from mmengine.optim.scheduler import MultiStepLR, MultiStepMomentum
    model = _cbn_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    runner = _FakeRunner(model, 10, 1)
    runner.param_schedulers = [MultiStepLR(opt, milestones=[9, 11], by_epoch=True),
                               MultiStepMomentum(opt, milestones=[5, 7], by_epoch=True)]
    CBNHook(burnin_epochs='first_lr_step').before_train(runner)
    assert model[1].burnin == model[2][1].burnin == 50


def test_burnin_epochs_become_iterations_of_this_run():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), CrossIterationBatchNorm2d(4, burnin=123),
                          nn.Sequential(nn.Conv2d(4, 4, 1), CrossIterationBatchNorm2d(4)))
    # 8 epochs of a 1,000-image set at 4 images/GPU on 4 GPUs: len(dataloader) = 63 per process
    CBNHook(burnin_epochs=8).before_train(_FakeRunner(model, 63, 4))
    assert [m.burnin for m in model.modules() if isinstance(m, CrossIterationBatchNorm2d)] == [504, 504]
    assert model[1].layer_name == '1' and model[2][1].layer_name == '2.1'
    assert burnin_iterations(0.5, 7) == 4 and burnin_iterations(0, 100) == 0


def test_burnin_until_the_first_lr_step_follows_the_schedule():
    """'first_lr_step' reads the run's MultiStepLR: epoch milestones x iterations per epoch, or
    iteration milestones as they are; the earliest milestone of any MultiStep scheduler."""
    from mmengine.optim.scheduler import LinearLR, MultiStepLR
    model = nn.Sequential(nn.Conv2d(3, 4, 3), CrossIterationBatchNorm2d(4),
                          nn.Sequential(nn.Conv2d(4, 4, 1), CrossIterationBatchNorm2d(4)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cbn = [m for m in model.modules() if isinstance(m, CrossIterationBatchNorm2d)]
    runner = _FakeRunner(model, 63, 4)
    runner.param_schedulers = [LinearLR(opt, start_factor=0.5, by_epoch=False, end=10),
                               MultiStepLR(opt, milestones=[11, 8], by_epoch=True)]
    CBNHook(burnin_epochs='first_lr_step').before_train(runner)
    assert [m.burnin for m in cbn] == [8 * 63] * 2
    runner.param_schedulers = dict(
        a=[MultiStepLR.build_iter_from_epoch(opt, milestones=[2, 3], epoch_length=63)])
    CBNHook(burnin_epochs=1, burnin_epochs_by_module={'2': 'first_lr_step'}).before_train(runner)
    assert [m.burnin for m in cbn] == [63, 2 * 63]
    runner.param_schedulers = [LinearLR(opt, start_factor=0.5, by_epoch=False, end=10)]
    with pytest.raises(ValueError, match="'first_lr_step' needs a MultiStepLR.*LinearLR"):
        CBNHook(burnin_epochs='first_lr_step').before_train(runner)


def test_longest_module_prefix_sets_the_burnin():
    """Nested prefixes: a layer under both '2' and '2.1' takes the burn-in of '2.1' (the more
    specific), a sibling under '2' alone takes that of '2', the rest the global one, whatever
    the order of the dict."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), CrossIterationBatchNorm2d(4),
                          nn.Sequential(nn.Conv2d(4, 4, 1), CrossIterationBatchNorm2d(4),
                                        CrossIterationBatchNorm2d(4)))
    for by_module in ({'2': 2, '2.1': 3}, {'2.1': 3, '2': 2}):
        CBNHook(burnin_epochs=1, burnin_epochs_by_module=by_module).before_train(
            _FakeRunner(model, 10, 1))
        assert [model[1].burnin, model[2][1].burnin, model[2][2].burnin] == [10, 30, 20]


class _TwoBranches(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 3), CrossIterationBatchNorm2d(4, window=4, burnin=0))
        self.b = nn.Sequential(nn.Conv2d(3, 4, 3), CrossIterationBatchNorm2d(4, window=4, burnin=0))

    def forward(self, x, use_b):
        out_b = self.b(x)
        return self.a(x).square().mean() + (out_b.square().mean() if use_b else 0)


def _three_iterations(driven):
    """Three SGD iterations; branch b runs in each but misses the loss in the second (its
    gradients are None then, so no parameter of b changes before the third)."""
    torch.manual_seed(0)
    model = _TwoBranches()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook, runner = CBNHook(), _FakeRunner(model, 3, 1, epochs=1)
    if driven:
        hook.before_train(runner)
    for i, use_b in enumerate((True, False, True)):
        if driven:
            hook.before_train_iter(runner, i)
        opt.zero_grad(set_to_none=True)
        model(torch.randn(2, 3, 6, 6), use_b).backward()
        opt.step()
    return model.b[1]


def test_runner_iterations_are_the_steps_of_every_layer():
    """Under CBNHook each runner iteration begins a step of every CBN layer: a branch whose
    output missed the loss in one iteration still counts three steps in three iterations and
    pools one call stream; inferred from its calls alone, its second and third calls look like
    two calls of one step (the case the hook exists for)."""
    b = _three_iterations(driven=True)
    assert b.cbn_step.item() == 3 and b.ring.streams() == 1 and b.cbn_valid.sum() == 3
    inferred = _three_iterations(driven=False)
    assert inferred.cbn_step.item() == 2 and inferred.ring.streams() == 2


@pytest.mark.parametrize('bad', [-1, 'eight', True])
def test_hook_rejects_bad_burnin(bad):
    with pytest.raises(ValueError, match='burnin_epochs'):
        CBNHook(burnin_epochs=bad)


def test_sync_bn_conversion_refuses_cbn_models():
    """The runner's ``sync_bn`` (Runner.wrap_model, FlexibleRunner's DDPStrategy) refuses a
    model with CBN layers; mmengine's public function is left as it is (a direct call converts
    what it is given, as torch's does); models without CBN convert as before."""
    import mmengine._strategy.distributed as strategy_mod
    import mmengine.model.utils
    import mmengine.runner.runner as runner_mod
    from mmengine.model import convert_sync_batchnorm
    model = nn.Sequential(nn.Conv2d(3, 4, 3), CrossIterationBatchNorm2d(4))
    for convert in (runner_mod.convert_sync_batchnorm, strategy_mod.convert_sync_batchnorm):
        with pytest.raises(CBNSyncBNError, match="SyncCBN"):
            convert(model)
        plain = convert(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
        assert type(plain[1]) is nn.SyncBatchNorm  # models without CBN convert as before
        assert convert.__wrapped__ is mmengine.model.utils.convert_sync_batchnorm
    assert convert_sync_batchnorm is mmengine.model.utils.convert_sync_batchnorm
    assert not hasattr(convert_sync_batchnorm, '__cbn_guard__')


class _Exploit:
    def __reduce__(self):
        from mmengine.logging import HistoryBuffer
        return (getattr, (HistoryBuffer, '__init__'))


class _Other:
    pass


def test_checkpoint_loader_allows_mmengine_types_only(tmp_path):
    import numpy as np
    from mmengine.logging import HistoryBuffer, MessageHub
    hub = MessageHub.get_instance('cbn-test-hub')
    hub.update_scalar('train/loss', 1.5)
    good = tmp_path / 'good.pth'
    torch.save(dict(state_dict={'w': torch.ones(2)}, message_hub=hub.state_dict(),
                    meta=dict(arr=np.arange(3), f=np.float64(2.0))), good)
    ck = load_local_checkpoint(str(good))
    assert isinstance(ck['message_hub']['log_scalars']['train/loss'], HistoryBuffer)

    from cbn_mmdet.engine.checkpoint import needs_safe_loader
    if not needs_safe_loader():
        pytest.skip(f'torch {torch.__version__} has no allow-list for weights_only loading '
                    '(torch.serialization.safe_globals, torch >= 2.5): mmengine\'s own loader is kept')
    bad = tmp_path / 'bad.pth'
    torch.save({'x': _Exploit()}, bad)
    with pytest.raises(Exception, match='refusing getattr'):
        load_local_checkpoint(str(bad))

    torch.save({'x': _Other()}, tmp_path / 'other.pth')
    with pytest.raises(Exception, match='Unsupported global'):
        load_local_checkpoint(str(tmp_path / 'other.pth'))


def test_checkpoint_loader_log_line_names_it(tmp_path):
    """mmengine logs 'Loads checkpoint by <loader name minus 10 characters> backend'."""
    from mmengine.runner.checkpoint import CheckpointLoader

    from cbn_mmdet.engine.checkpoint import needs_safe_loader
    loader = CheckpointLoader._get_checkpoint_loader(str(tmp_path / 'epoch_1.pth'))
    assert loader.__name__[10:] == ('local_safe' if needs_safe_loader() else 'local')


def test_ddp_wrapping_prints_no_broadcast_buffers_deprecation(monkeypatch):
    """mmengine's wrapping (broadcast_buffers=False: per-process CBN windows) in a 1-process
    gloo group: torch >= 2.13 warns about the argument unless the launcher hides that one
    message; nothing else is hidden."""
    import socket
    import warnings

    import torch.distributed as dist
    from mmengine.model import MMDistributedDataParallel

    from cbn_mmdet.engine.launch import quiet_broadcast_buffers_deprecation
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        port = sock.getsockname()[1]
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=0, world_size=1)
    try:
        def wrap():
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter('always')
                warnings.filterwarnings('ignore', category=DeprecationWarning)
                if quiet:
                    quiet_broadcast_buffers_deprecation()
                MMDistributedDataParallel(module=nn.Linear(2, 2), broadcast_buffers=False)
                warnings.warn('another FutureWarning', FutureWarning)
            return [str(w.message) for w in caught if issubclass(w.category, FutureWarning)]
        quiet = False
        loud = wrap()
        quiet = True
        assert wrap() == ['another FutureWarning']
        deprecated = 'forward_sync_buffers' in inspect.signature(
            nn.parallel.DistributedDataParallel.__init__).parameters
        assert any('broadcast_buffers' in m for m in loud) == deprecated
    finally:
        dist.destroy_process_group()
