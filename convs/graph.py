"""What a model's forward does with each conv's output, read from a torch.fx trace (for eq. 3.11's activation)."""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

# The call targets that apply a ReLU, as torch.fx records them (functions, and Tensor methods by name).
RELU_FUNCTIONS = frozenset({F.relu, F.relu_, torch.relu, torch.relu_})
RELU_METHODS = frozenset({"relu", "relu_"})


class _ConvLeafTracer(torch.fx.Tracer):
    """The default tracer, except that every nn.Conv2d (the variants too) stays one call, never traced into."""

    def is_leaf_module(self, module: nn.Module, qualname: str) -> bool:
        return isinstance(module, nn.Conv2d) or super().is_leaf_module(module, qualname)


def relu_after_bn(model: nn.Module) -> dict[nn.Conv2d, nn.BatchNorm2d]:
    """Plain convs whose output goes only to a BatchNorm2d whose output goes only to a ReLU, with that BatchNorm.

    A conv missing from the result is followed by something else: a BatchNorm whose output feeds an addition (the
    last conv of a residual branch, a downsample), another activation, or no BatchNorm at all. A conv called at
    several places is in the result only if every call is followed by the same BatchNorm and a ReLU. ReLU means an
    nn.ReLU module, F.relu, torch.relu, their in-place forms, or the Tensor methods relu/relu_.

    Args:
        model: any module; it is traced symbolically (torch.fx), not run, and not changed.

    Returns:
        {conv: the BatchNorm2d between it and the ReLU}.

    Raises:
        Whatever torch.fx raises for a forward it cannot trace (data-dependent control flow, for instance);
        `convert` catches it and falls back to the identity.

    Example:
        >>> import torchvision
        >>> import convs.graph
        >>> model = torchvision.models.resnet18()
        >>> found = convs.graph.relu_after_bn(model)
        >>> found[model.conv1] is model.bn1, model.layer1[0].conv1 in found, model.layer1[0].conv2 in found
        (True, True, False)
    """
    graph = _ConvLeafTracer().trace(model)
    verdicts: dict[nn.Conv2d, list[nn.BatchNorm2d | None]] = {}
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        conv = model.get_submodule(node.target)
        if type(conv) is not nn.Conv2d:
            continue
        verdicts.setdefault(conv, []).append(_bn_then_relu(model, node))
    return {conv: bns[0] for conv, bns in verdicts.items() if bns[0] is not None and all(bn is bns[0] for bn in bns)}


def _bn_then_relu(model: nn.Module, conv_node: torch.fx.Node) -> nn.BatchNorm2d | None:
    """The BatchNorm2d that is the only user of `conv_node`, if its only user in turn is a ReLU."""
    if len(conv_node.users) != 1:
        return None
    (bn_node,) = conv_node.users
    if bn_node.op != "call_module" or not isinstance(bn := model.get_submodule(bn_node.target), nn.BatchNorm2d):
        return None
    if len(bn_node.users) != 1:
        return None
    (user,) = bn_node.users
    return bn if _is_relu(model, user) else None


def _is_relu(model: nn.Module, node: torch.fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(model.get_submodule(node.target), nn.ReLU)
    if node.op == "call_function":
        return node.target in RELU_FUNCTIONS
    return node.op == "call_method" and node.target in RELU_METHODS
