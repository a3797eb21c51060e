"""Stop mmengine's ``sync_bn`` runner option from silently turning CBN layers into SyncBN.

mmengine converts every ``_BatchNorm`` subclass when ``sync_bn`` is set; CBN subclasses
``_BatchNorm`` (so checkpoints, ``norm_eval`` and isinstance checks keep working), so the
conversion would replace it by a plain SyncBatchNorm without a word. We wrap the converter the
runner calls so that it refuses models holding CBN layers.
"""
import functools

from ..cbn import CrossIterationBatchNorm2d

_installed = False


class CBNSyncBNError(RuntimeError):
    """Raised when a model with CBN layers is about to be converted to SyncBatchNorm."""


def guard(convert):
    @functools.wraps(convert)
    def convert_sync_batchnorm(module, *args, **kwargs):
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
    global _installed
    if _installed:
        return
    import mmengine.model
    import mmengine.model.utils
    import mmengine.runner.runner as runner_mod
    for mod in (mmengine.model, mmengine.model.utils, runner_mod):
        fn = getattr(mod, 'convert_sync_batchnorm', None)
        if fn is not None and not getattr(fn, '__cbn_guard__', False):
            mod.convert_sync_batchnorm = guard(fn)
    _installed = True
