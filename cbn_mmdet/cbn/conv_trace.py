"""Find the convolution that produced a tensor, from the tensor's autograd graph.

CBN compensates its stored statistics with the derivative with respect to the weight of the
conv that feeds it. Reading that conv off ``y.grad_fn`` makes the layer a drop-in: no model
surgery, no weight passed by hand, and it works for any model, not only mmdet's.
"""
from typing import NamedTuple, Optional, Tuple

import torch


class ConvRecord(NamedTuple):
    """What the weight-gradient routines need about the conv that produced ``y``."""

    node: object                    # the conv's autograd node
    weight: Optional[torch.Tensor]  # the trainable parameter; None when the weight is frozen
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]
    groups: int

    # Read on demand: under saved-tensor hooks (non-reentrant activation checkpointing) reading
    # a saved tensor triggers its recomputation.
    @property
    def input(self) -> torch.Tensor:
        """The input the conv saved for its own backward."""
        return self.node._saved_input

    @property
    def saved_weight(self) -> torch.Tensor:
        """The weight as the conv used it (a cast copy under autocast)."""
        return self.node._saved_weight


def _leaf_parameter(edge) -> Optional[torch.Tensor]:
    """Follow an autograd edge through dtype casts (autocast) to the leaf it accumulates into."""
    fn = edge[0]
    while fn is not None:
        name = type(fn).__name__
        if name == 'AccumulateGrad':
            return fn.variable
        if name != 'ToCopyBackward0' or len(fn.next_functions) != 1:
            return None
        fn = fn.next_functions[0][0]
    return None


def find_producing_conv(y: torch.Tensor) -> Tuple[Optional[ConvRecord], str]:
    """Return the 2-d convolution that produced ``y`` and a reason string.

    The record is None when there is no autograd graph (nothing upstream trains, so nothing
    needs compensating) or when ``y`` was not produced directly by a non-transposed 2-d conv.
    The reason is 'conv', 'no-graph' or a short description of what produced ``y``.
    """
    fn = y.grad_fn
    if fn is None:
        return None, 'no-graph'
    if type(fn).__name__ != 'ConvolutionBackward0':
        return None, type(fn).__name__
    if fn._saved_transposed:
        return None, 'transposed convolution'
    stride = tuple(fn._saved_stride)
    if len(stride) != 2:
        return None, f'{len(stride)}-d convolution'
    weight = _leaf_parameter(fn.next_functions[1])
    if weight is not None and (not weight.requires_grad or weight.dim() != 4):
        weight = None
    return ConvRecord(fn, weight, stride, tuple(fn._saved_padding), tuple(fn._saved_dilation),
                      int(fn._saved_groups)), 'conv'
