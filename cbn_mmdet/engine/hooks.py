"""mmengine hook that turns the configs' burn-in (in epochs) into iterations and names layers."""
from typing import Optional

from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from ..cbn import CrossIterationBatchNorm2d, name_cbn_layers


def burnin_iterations(burnin_epochs: float, iters_per_epoch: int) -> int:
    """Training iterations in ``burnin_epochs`` epochs of ``iters_per_epoch`` iterations."""
    if burnin_epochs < 0:
        raise ValueError(f'CBNHook option `burnin_epochs` must be >= 0, got {burnin_epochs!r}')
    return int(round(burnin_epochs * iters_per_epoch))


@HOOKS.register_module()
class CBNHook(Hook):
    """Prepares the model's CBN layers before training.

    Args:
        burnin_epochs: when set, every CBN layer's ``burnin`` becomes this many epochs worth of
            iterations of *this* run: ``len(train_dataloader)`` already reflects the dataset
            length, the per-GPU batch size and the world size.
    """

    priority = 'VERY_HIGH'

    def __init__(self, burnin_epochs: Optional[float] = None):
        if burnin_epochs is not None and (isinstance(burnin_epochs, bool)
                                          or not isinstance(burnin_epochs, (int, float))):
            raise ValueError(f'CBNHook option `burnin_epochs` must be a number >= 0 or None, '
                             f'got {burnin_epochs!r}')
        if burnin_epochs is not None:
            burnin_iterations(burnin_epochs, 1)  # validates the sign
        self.burnin_epochs = burnin_epochs

    def before_train(self, runner) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        layers = [m for m in model.modules() if isinstance(m, CrossIterationBatchNorm2d)]
        name_cbn_layers(model)
        if not layers:
            runner.logger.warning('CBNHook: the model has no CBN layer')
            return
        msg = f'CBNHook: {len(layers)} CBN layers'
        if self.burnin_epochs is not None:
            iters = burnin_iterations(self.burnin_epochs, len(runner.train_dataloader))
            for m in layers:
                m.burnin = iters
            msg += (f'; burn-in {self.burnin_epochs} epochs = {iters} iterations '
                    f'({len(runner.train_dataloader)} iterations per epoch on each of '
                    f'{runner.world_size} processes)')
        windows = sorted({m.window for m in layers})
        msg += f'; window {windows}; steps already seen by the first layer: {layers[0]._step}'
        runner.logger.info(msg)


@HOOKS.register_module()
class SeedPerIterationHook(Hook):
    """Reseed python, numpy and torch before every training iteration from (seed, iteration).

    mmengine does not save random states in checkpoints, so after ``--resume`` the RPN/RoI
    samplers draw different numbers than an uninterrupted run. With this hook a resumed run
    repeats the uninterrupted one (with ``randomness.deterministic=True`` and a fixed thread
    count), which is how the resume tests compare losses.
    """

    priority = 'VERY_HIGH'

    def __init__(self, seed: int = 0):
        self.seed = seed

    def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
        import random

        import numpy as np
        import torch
        s = (self.seed * 1_000_003 + runner.iter) % 2 ** 31
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)
