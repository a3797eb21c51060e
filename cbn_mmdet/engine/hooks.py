"""mmengine hook that turns the configs' burn-in (in epochs) into iterations and names layers."""
from typing import Optional

from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

from ..cbn import CrossIterationBatchNorm2d, keep_producing_convs_eager, name_cbn_layers
from .checkpoint import install_checkpoint_loader


def burnin_iterations(burnin_epochs: float, iters_per_epoch: int) -> int:
    """Training iterations in ``burnin_epochs`` epochs of ``iters_per_epoch`` iterations."""
    if burnin_epochs < 0:
        raise ValueError(f'CBNHook option `burnin_epochs` must be >= 0, got {burnin_epochs!r}')
    return int(round(burnin_epochs * iters_per_epoch))


FIRST_LR_STEP = 'first_lr_step'


def first_lr_step(runner) -> int:
    """The iteration of the first learning-rate decay of the run's MultiStepLR schedule."""
    scheds = runner.param_schedulers
    if isinstance(scheds, dict):
        scheds = [s for group in scheds.values() for s in group]
    steps = []
    for s in scheds or []:
        milestones = getattr(s, 'milestones', None)
        if type(s).__name__.startswith('MultiStep') and milestones:
            first = min(milestones)
            steps.append(first * len(runner.train_dataloader) if s.by_epoch else first)
    if not steps:
        raise ValueError(f"CBNHook: burn-in {FIRST_LR_STEP!r} needs a MultiStepLR (or MultiStepMomentum) "
                         'scheduler with milestones in param_scheduler; this run has '
                         f'{[type(s).__name__ for s in scheds or []]}. Give the burn-in in epochs instead.')
    return min(steps)


@HOOKS.register_module()
class CBNHook(Hook):
    """Prepares the model's CBN layers before training.

    Args:
        burnin_epochs: when set, every CBN layer's ``burnin`` becomes this many epochs worth of
            iterations of *this* run: ``len(train_dataloader)`` already reflects the dataset
            length, the per-GPU batch size and the world size. ``'first_lr_step'``: until the
            first milestone of the run's MultiStepLR, wherever the schedule puts it (the window
            starts after the high-lr phase, as the paper's 8 epochs of 12 do).
        burnin_epochs_by_module: ``{module name prefix: epochs}`` overriding ``burnin_epochs``
            for the CBN layers under that module (the longest matching prefix wins), e.g.
            ``dict(backbone=0.05)`` for a short burn-in of a CBN backbone.
        save_window: write every CBN layer's window into checkpoints (``checkpoint
            ['cbn_window']``, beside the state_dict), so that ``--resume`` continues exactly.
            False: checkpoints hold what a BN model's do plus two counters per layer, and a
            resumed run refills each window in its first ``window - 1`` iterations.

    Building the hook lets mmengine's loader allow mmengine's checkpoint types (message hub,
    numpy) under torch's safe loading for every checkpoint of the process, so that ``--resume``
    and ``load_from`` work on torch >= 2.6 (see :mod:`cbn_mmdet.engine.checkpoint`).

    Also: after ``load_from`` (a new run from trained weights) every CBN layer starts with an
    empty window at step 0 and this run's burn-in; after ``--resume`` everything continues.
    The runner's iterations are the layers' training steps (no inference from the autograd
    graph), so a branch that misses the loss in one iteration cannot merge two iterations.
    """

    priority = 'VERY_HIGH'

    def __init__(self, burnin_epochs=None, burnin_epochs_by_module: Optional[dict] = None,
                 save_window: bool = True):
        if not isinstance(save_window, bool):
            raise ValueError(f'CBNHook option `save_window` must be True or False, got {save_window!r}')
        self.save_window = save_window
        self._loaded = None         # 'resume' or 'load_from', from after_load_checkpoint
        self._saved_windows = None  # the resumed checkpoint's windows, restored in before_train
        for name, value in [('burnin_epochs', burnin_epochs)] + [
                (f'burnin_epochs_by_module[{k!r}]', v) for k, v in (burnin_epochs_by_module or {}).items()]:
            if value is not None and value != FIRST_LR_STEP and (
                    isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
                raise ValueError(f'CBNHook option `{name}` must be a number >= 0, '
                                 f'{FIRST_LR_STEP!r} or None, got {value!r}')
        if burnin_epochs_by_module is not None and (
                not isinstance(burnin_epochs_by_module, dict)
                or not all(isinstance(k, str) and k for k in burnin_epochs_by_module)):
            raise ValueError('CBNHook option `burnin_epochs_by_module` must be a dict of module '
                             f'name prefixes to epochs, got {burnin_epochs_by_module!r}')
        self.burnin_epochs = burnin_epochs
        self.by_module = dict(burnin_epochs_by_module or {})
        self._driven = []
        # the runner that builds this hook loads its checkpoints (--resume, load_from) after
        # building its hooks: mmengine's loader then allows mmengine's checkpoint types
        install_checkpoint_loader(any_checkpoint=True)

    def _epochs_for(self, name: str):
        hits = [p for p in self.by_module if name == p or name.startswith(p + '.')]
        return self.by_module[max(hits, key=len)] if hits else self.burnin_epochs

    @staticmethod
    def _layers(runner):
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        return model, [(n, m) for n, m in model.named_modules()
                       if isinstance(m, CrossIterationBatchNorm2d)]

    def after_load_checkpoint(self, runner, checkpoint) -> None:
        """Runs before the weights are loaded; which of resume / load_from it was decides
        what before_train does with the layers' state."""
        self._loaded = 'resume' if runner._resume else 'load_from'
        self._saved_windows = checkpoint.get('cbn_window') if runner._resume else None

    def before_save_checkpoint(self, runner, checkpoint) -> None:
        if self.save_window:
            checkpoint['cbn_window'] = {n: m.window_state() for n, m in self._layers(runner)[1]}

    def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
        for m in self._driven:
            m.steps.new_iteration()

    def _continue_or_restart(self, runner, named) -> str:
        if self._loaded == 'load_from':
            for _, m in named:
                m.start_new_run()
            return (f'weights loaded from {runner._load_from} for a new run (load_from): every '
                    'CBN layer starts with an empty window at step 0')
        if self._loaded != 'resume':
            return f'steps already seen by the first layer: {named[0][1]._step}'
        if self._saved_windows is None:
            return (f'resumed at step {named[0][1]._step}; the checkpoint holds no window '
                    '(saved with save_window=False): each layer refills its window in its next '
                    'window - 1 iterations')
        missing = [n for n, _ in named if n not in self._saved_windows]
        if missing:
            raise RuntimeError(f'CBNHook: the resumed checkpoint has no window for {len(missing)} '
                               f'CBN layers ({", ".join(missing[:3])}, ...): not the same model')
        for n, m in named:
            m.load_window_state(self._saved_windows[n])
        self._saved_windows = None
        return f'resumed at step {named[0][1]._step} with the saved windows of {len(named)} layers'

    def before_train(self, runner) -> None:
        model, named = self._layers(runner)
        layers = [m for _, m in named]
        name_cbn_layers(model)
        self._driven = layers
        for m in layers:
            m.drive_steps_by_runner()
        if not layers:
            runner.logger.warning('CBNHook: the model has no CBN layer')
            return
        msg = f'CBNHook: {len(layers)} CBN layers'
        if (getattr(runner, 'cfg', None) or {}).get('compile', None) not in (None, False):
            eager = keep_producing_convs_eager(model)
            msg += (f'; torch.compile: the {len(eager)} convs feeding them run eagerly in '
                    'training (so the compensation can read them)')
        per_epoch = len(runner.train_dataloader)
        groups = {}
        for name, m in named:
            epochs = self._epochs_for(name)
            if epochs is not None:
                groups.setdefault(epochs, []).append((name, m))
        for epochs, members in sorted(groups.items(), key=lambda kv: str(kv[0])):
            iters = first_lr_step(runner) if epochs == FIRST_LR_STEP else burnin_iterations(epochs, per_epoch)
            for _, m in members:
                m.burnin = iters
            where = '' if len(groups) == 1 else f' for {len(members)} layers ({members[0][0]}, ...)'
            what = 'until the first lr step' if epochs == FIRST_LR_STEP else f'{epochs} epochs'
            msg += f'; burn-in {what} = {iters} iterations{where}'
        if groups:
            msg += f' ({per_epoch} iterations per epoch on each of {runner.world_size} processes)'
        windows = sorted({m.window for m in layers})
        msg += f'; window {windows}; {self._continue_or_restart(runner, named)}'
        runner.logger.info(msg)
        self._warn_if_never_windowed(runner, named)

    @staticmethod
    def _warn_if_never_windowed(runner, named) -> None:
        """One warning when burn-ins last the whole run (a shortened schedule, say): those
        layers are plain BatchNorm2d throughout, which is worth knowing before the run."""
        total = runner.max_iters
        stuck = [(n, m.burnin) for n, m in named if m.window > 1 and m.burnin >= total]
        if not stuck:
            return
        names = ', '.join(n for n, _ in stuck[:4]) + (', ...' if len(stuck) > 4 else '')
        burnins = sorted({b for _, b in stuck})
        runner.logger.warning(
            f'CBNHook: {len(stuck)} of {len(named)} CBN layers ({names}) have a burn-in of '
            f'{burnins[0] if len(burnins) == 1 else burnins} iterations, at least the '
            f"{total} training iterations of this run: they train as plain BatchNorm2d "
            'throughout and never use their window. Shorten `burnin_epochs` (or the layers\' '
            '`burnin`) or train longer.')


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
