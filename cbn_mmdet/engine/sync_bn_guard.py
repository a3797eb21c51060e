"""Stop mmengine's ``sync_bn`` runner option from silently turning CBN layers into SyncBN.

mmengine converts every ``_BatchNorm`` subclass when ``sync_bn`` is set; CBN subclasses
``_BatchNorm`` (so checkpoints, ``norm_eval`` and isinstance checks keep working), so the
conversion would replace it by a plain SyncBatchNorm without a word. The option is implemented
in two places, ``Runner.wrap_model`` and ``DDPStrategy.convert_model`` (FlexibleRunner); each
calls ``convert_sync_batchnorm`` through its own module's global name. We rebind that name, in
those two modules only, to a wrapper that refuses models holding CBN layers and otherwise is
the same call of mmengine's function (same arguments, same returned object). mmengine's public
``mmengine.model.convert_sync_batchnorm`` (and its recursion) is left untouched, like torch's
``nn.SyncBatchNorm.convert_sync_batchnorm``: a direct call converts what it is given.

This is done when ``cbn_mmdet`` is imported (``custom_imports`` in a config run by
MMDetection's own tools): the runner converts the model while it is built, before any hook of
ours exists.
"""
import functools

import torch.nn as nn

from ..cbn import CrossIterationBatchNorm2d

_installed = False

# modules whose global ``convert_sync_batchnorm`` implements the ``sync_bn`` option
GUARDED_MODULES = ('mmengine.runner.runner', 'mmengine._strategy.distributed')


class CBNSyncBNError(RuntimeError):
    """Raised when a model with CBN layers is about to be converted to SyncBatchNorm."""


def guard(convert):
    @functools.wraps(convert)
    def convert_sync_batchnorm(module, *args, **kwargs):
        if isinstance(module, nn.Module):
            names = [n for n, m in module.named_modules() if isinstance(m, CrossIterationBatchNorm2d)]
            if names:
                raise CBNSyncBNError(
                    f'sync_bn would replace {len(names)} CBN layers (e.g. {names[0]!r}) by SyncBatchNorm '
                    "and drop cross-iteration normalization. Remove the `sync_bn` option; for "
                    "cross-GPU statistics use norm_cfg=dict(type='SyncCBN').")
        return convert(module, *args, **kwargs)
    convert_sync_batchnorm.__cbn_guard__ = True
    return convert_sync_batchnorm


def install_sync_bn_guard():
    """Rebind ``convert_sync_batchnorm`` in :data:`GUARDED_MODULES` (idempotent)."""
    global _installed
    if _installed:
        return
    import importlib
    for name in GUARDED_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:  # another mmengine layout: nothing of it to guard
            continue
        fn = getattr(mod, 'convert_sync_batchnorm', None)
        if fn is not None and not getattr(fn, '__cbn_guard__', False):
            mod.convert_sync_batchnorm = guard(fn)
    _installed = True
