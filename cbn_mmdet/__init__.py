"""Cross-Iteration Batch Normalization (CBN) for MMDetection 3.x.

Importing the package registers ``CBN`` and ``SyncCBN`` (also under their class names) in
MMEngine's MODELS registry (so ``norm_cfg=dict(type='CBN')`` works in any MMDetection config),
the ``CBNHook``, a safe loader for mmengine checkpoints under torch >= 2.6, and a guard against
the runner's ``sync_bn``.
"""
from .cbn import (CrossIterationBatchNorm2d, SyncCrossIterationBatchNorm2d, convert_bn_to_cbn,
                  convert_cbn_to_bn, name_cbn_layers)

__version__ = '0.1.0'
__all__ = ['CrossIterationBatchNorm2d', 'SyncCrossIterationBatchNorm2d', 'convert_bn_to_cbn', 'convert_cbn_to_bn',
           'name_cbn_layers', '__version__']

try:
    import mmengine  # noqa: F401
except ImportError:  # the layer itself needs only torch
    pass
else:
    from mmengine.registry import MODELS

    MODELS.register_module('CBN', module=CrossIterationBatchNorm2d, force=True)
    MODELS.register_module('CrossIterationBatchNorm2d', module=CrossIterationBatchNorm2d, force=True)
    MODELS.register_module('SyncCBN', module=SyncCrossIterationBatchNorm2d, force=True)
    MODELS.register_module('SyncCrossIterationBatchNorm2d', module=SyncCrossIterationBatchNorm2d,
                           force=True)

    from .engine import CBNHook, install_checkpoint_loader, install_sync_bn_guard  # noqa: E402
    install_checkpoint_loader()
    install_sync_bn_guard()
    __all__ += ['CBNHook']
