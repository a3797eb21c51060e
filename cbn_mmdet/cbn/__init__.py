from .convert import convert_bn_to_cbn, convert_cbn_to_bn, name_cbn_layers
from .eager_conv import EagerConv2d, keep_producing_convs_eager
from .layer import CrossIterationBatchNorm2d
from .sync import SyncCrossIterationBatchNorm2d

__all__ = ['CrossIterationBatchNorm2d', 'SyncCrossIterationBatchNorm2d', 'convert_bn_to_cbn',
           'convert_cbn_to_bn', 'name_cbn_layers', 'EagerConv2d', 'keep_producing_convs_eager']
