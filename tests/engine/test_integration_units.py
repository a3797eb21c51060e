"""CBNHook's burn-in conversion, the sync_bn guard and the checkpoint loader's allowlist."""
import logging

import pytest
import torch
import torch.nn as nn

import cbn_mmdet  # noqa: F401  installs the loader and the guard
from cbn_mmdet.cbn import CrossIterationBatchNorm2d
from cbn_mmdet.engine import CBNHook, CBNSyncBNError, burnin_iterations, load_local_checkpoint


class _FakeRunner:
    def __init__(self, model, iters_per_epoch, world_size):
        self.model = model
        self.train_dataloader = range(iters_per_epoch)
        self.world_size = world_size
        self.logger = logging.getLogger('fake-runner')


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


@pytest.mark.parametrize('bad', [-1, 'eight', True])
def test_hook_rejects_bad_burnin(bad):
    with pytest.raises(ValueError, match='burnin_epochs'):
        CBNHook(burnin_epochs=bad)


def test_sync_bn_conversion_refuses_cbn_models():
    import mmengine.runner.runner as runner_mod
    from mmengine.model import convert_sync_batchnorm
    model = nn.Sequential(nn.Conv2d(3, 4, 3), CrossIterationBatchNorm2d(4))
    for convert in (runner_mod.convert_sync_batchnorm, convert_sync_batchnorm):
        with pytest.raises(CBNSyncBNError, match="SyncCBN"):
            convert(model)
    plain = convert_sync_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    assert isinstance(plain[1], nn.SyncBatchNorm)  # models without CBN convert as before


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

    bad = tmp_path / 'bad.pth'
    torch.save({'x': _Exploit()}, bad)
    with pytest.raises(Exception, match='refusing getattr'):
        load_local_checkpoint(str(bad))

    torch.save({'x': _Other()}, tmp_path / 'other.pth')
    with pytest.raises(Exception, match='Unsupported global'):
        load_local_checkpoint(str(tmp_path / 'other.pth'))
