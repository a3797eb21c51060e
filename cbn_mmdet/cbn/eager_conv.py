"""torch.compile and CBN: the conv feeding each CBN layer runs eagerly in training.

CBN reads its conv off the input's autograd graph (``ConvolutionBackward0``: the conv's input
and weight). Where dynamo compiles that conv, the input arrives from a compiled graph
(``CompiledFunctionBackward``) and the compensation has nothing to work with. So, before
compiling, each conv that feeds a CBN layer is given a training forward that dynamo does not
trace (:class:`EagerConv2d`); the rest of the model compiles as usual, and in eval mode the conv
compiles too. ``CBNHook`` does this when mmengine compiles (``compile=True``); plain PyTorch
calls :func:`keep_producing_convs_eager` before ``torch.compile``.
"""
from typing import List, Tuple

import torch
import torch.nn as nn

from .layer import CrossIterationBatchNorm2d


class EagerConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose training forward (with gradients on) runs outside torch.compile's
    graphs, so that the CBN layer after it sees ``ConvolutionBackward0``; elsewhere (eval, no
    grad) it is traced like any conv. Same parameters, state_dict and ``isinstance`` as Conv2d."""

    def forward(self, input):
        if self.training and torch.is_grad_enabled():
            return self._eager_forward(input)
        return super().forward(input)

    @torch.compiler.disable
    def _eager_forward(self, input):
        return nn.Conv2d.forward(self, input)


def producing_conv_pairs(model: nn.Module) -> List[Tuple[str, nn.Module, str]]:
    """``(conv name, conv, CBN name)`` for each CBN layer whose conv is its sibling registered
    just before it with matching channels, as in mmdet/mmcv (``conv1`` then ``bn1`` in ResNet
    blocks, ``conv`` then ``norm`` in ConvModule, ``Sequential(conv, norm)``)."""
    pairs = []
    for parent_name, parent in model.named_modules():
        children = list(parent.named_children())
        for (name_a, a), (name_b, b) in zip(children, children[1:]):
            if (isinstance(b, CrossIterationBatchNorm2d) and isinstance(a, nn.Conv2d)
                    and a.out_channels == b.num_features):
                prefix = parent_name + '.' if parent_name else ''
                pairs.append((prefix + name_a, a, prefix + name_b))
    return pairs


def keep_producing_convs_eager(model: nn.Module) -> List[str]:
    """Make the conv feeding each CBN layer an :class:`EagerConv2d` (in place, weights kept);
    returns the names of the convs changed. Call it before ``torch.compile(model)``. Only plain
    ``nn.Conv2d`` is changed: a subclass (deformable conv, adaptive padding) keeps its class, and
    its CBN layer warns if it cannot find it under compile."""
    changed = []
    for conv_name, conv, _ in producing_conv_pairs(model):
        if type(conv) is nn.Conv2d:
            conv.__class__ = EagerConv2d
            changed.append(conv_name)
    return changed
