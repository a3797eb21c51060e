"""Cross-Iteration Batch Normalization (CBN) for MMDetection 3.x.

Importing the package registers ``CBN`` and ``SyncCBN`` (also under their class names) in
MMEngine's MODELS registry (so ``norm_cfg=dict(type='CBN')`` works in any MMDetection config)
and our hooks (``CBNHook``, ...) in HOOKS, lets mmengine's loader read CBN checkpoints under
torch >= 2.6 and guards the runner's ``sync_bn`` option against models with CBN layers. Code
that does not use CBN sees no change: the complete list is in docs/install.md ("What importing
cbn_mmdet changes").
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

    # both narrow, see docs/install.md ("What importing cbn_mmdet changes"): the loader
    # differs from mmengine's for CBN checkpoints only, the guard for models with CBN only
    from .engine import CBNHook, install_checkpoint_loader, install_sync_bn_guard  # noqa: E402
    install_checkpoint_loader()
    install_sync_bn_guard()
    __all__ += ['CBNHook']
