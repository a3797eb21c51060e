"""CBN model -> stock MMDetection BN model, as files (tools/model_converters/cbn_to_bn.py).

Eval-mode CBN is BatchNorm2d, so a trained CBN detector deploys as a BN detector: the config
with every CBN norm layer as BN and nothing of cbn_mmdet left, the checkpoint without the
CBN-only state. ``convert_cbn_to_bn`` (cbn_mmdet.cbn.convert) does the same to a model in
memory; this package does it to a config and a checkpoint on disk.
"""
from .cbn_to_bn import Converted, cbn_to_bn
from .checkpoint import convert_checkpoint, strip_cbn_state
from .config import SYNC_CBN_AS, convert_config_dict
from .errors import ConversionError

__all__ = ['cbn_to_bn', 'Converted', 'ConversionError', 'convert_config_dict', 'convert_checkpoint',
           'strip_cbn_state', 'SYNC_CBN_AS']
