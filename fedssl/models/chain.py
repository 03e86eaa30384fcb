"""A feed-forward network as a chain of convolutional and linear layers.

Matched averaging (FedMA, fedssl.algorithms.fedma) permutes the hidden units of one
layer and, to keep the network's function, the input dimensions of the next: it
is defined only where every layer with weights is a Conv2d or a Linear and each
one takes the previous one's output (after parameter-free activations, pooling
and flattening). `layer_chain` finds that chain or says which layer breaks it;
`resize_to` gives a model the widths of arrays whose layers grew in matching.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fedssl.errors import UserError


@dataclass(frozen=True)
class Layer:
    """One layer of the chain.

    Attributes:
        name: the module's name in the model (its arrays are `name.weight`, `name.bias`).
        kind: "conv" or "linear".
        spatial: input positions per input channel: a linear layer after a convolution
            reads C x H x W flattened (channel-major), so each channel of the previous
            layer feeds `spatial` = H*W of its inputs; 1 otherwise.
        width: output units (channels) in the model the chain was read from.
        bias: whether the layer has a bias.
    """

    name: str
    kind: str
    spatial: int
    width: int
    bias: bool

    @property
    def weight_name(self) -> str:
        return f"{self.name}.weight"

    @property
    def array_names(self) -> list[str]:
        return [self.weight_name] + ([f"{self.name}.bias"] if self.bias else [])


def _inputs(module: nn.Module) -> int:
    return module.in_channels if isinstance(module, nn.Conv2d) else module.in_features


def _outputs(module: nn.Module) -> int:
    return module.out_channels if isinstance(module, nn.Conv2d) else module.out_features


def layer_chain(model: nn.Module, key: str = "model.name") -> list[Layer]:
    """The model's conv/linear layers in order, or a `UserError` naming the first
    module that is not one (normalization, attention, embeddings: anything else with
    weights) or the first layer that does not take the previous one's output
    (residual connections, branches, grouped convolutions).

    The order is the modules' registration order, which for a feed-forward network
    built as a chain is the order data flows through it; the shape checks catch
    the networks where it is not.
    """
    what = type(model).__name__
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        own = [n for n, _ in module.named_parameters(recurse=False)] + [n for n, _ in module.named_buffers(recurse=False)]
        if isinstance(module, (nn.Conv2d, nn.Linear)) and type(module) in (nn.Conv2d, nn.Linear):
            if isinstance(module, nn.Conv2d) and module.groups != 1:
                raise UserError(f"{key}: fedma cannot match layer {name!r} of {what}: a grouped convolution "
                                f"(groups={module.groups}) mixes no channels across groups")
            found.append((name, module))
        elif own:
            holder = f"{type(module).__name__} {name!r}" if name else "a module"
            raise UserError(f"{key}: fedma matches only the Conv2d and Linear layers of a feed-forward chain; "
                            f"{what} has {holder} with weights ({f'{name}.{own[0]}' if name else own[0]})")
    if len(found) < 2:
        raise UserError(f"{key}: fedma needs at least two conv/linear layers to match, {what} has {len(found)}")
    found = _traced_order(model, dict(found), key)
    layers = []
    for index, (name, module) in enumerate(found):
        spatial = 1
        if index:
            prev_name, prev = found[index - 1]
            width, takes = _outputs(prev), _inputs(module)
            fits = takes == width
            if isinstance(module, nn.Linear) and isinstance(prev, nn.Conv2d):
                fits = takes % width == 0
                spatial = takes // width
            elif isinstance(module, nn.Conv2d) and isinstance(prev, nn.Linear):
                fits = False
            if not fits:
                raise UserError(f"{key}: fedma cannot order {what} as a chain: layer {name!r} takes {takes} inputs, "
                                f"which are not the {width} outputs of {prev_name!r} before it (residual "
                                "connections and branches are not supported)")
        layers.append(Layer(name, "conv" if isinstance(module, nn.Conv2d) else "linear", spatial, _outputs(module),
                            module.bias is not None))
    return layers


def _traced_order(model: nn.Module, layers: dict[str, nn.Module], key: str) -> list[tuple[str, nn.Module]]:
    """The layers in the order the forward pass calls them (torch.fx), refusing a
    forward that combines two tensors (a residual sum, a concatenation, attention's
    products) or calls a layer twice or never."""
    what = type(model).__name__
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as error:  # noqa: BLE001 - whatever stops tracing stops the check
        raise UserError(f"{key}: fedma cannot trace {what}'s forward to check that it is a chain of layers "
                        f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from None
    order: list[str] = []
    for node in graph.nodes:
        if node.op == "call_module" and node.target in layers:
            if node.target in order:
                raise UserError(f"{key}: fedma cannot match {what}: layer {node.target!r} is called more than once")
            order.append(node.target)
        elif node.op in ("call_function", "call_method"):
            inputs = [arg for arg in (*node.args, *node.kwargs.values()) if isinstance(arg, torch.fx.Node)
                      and arg.op != "get_attr"]
            nested = [a for arg in node.args if isinstance(arg, (list, tuple)) for a in arg if isinstance(a, torch.fx.Node)]
            if len(inputs) + len(nested) >= 2:
                raise UserError(f"{key}: fedma cannot order {what} as a chain: its forward combines two tensors at "
                                f"{node.name!r} ({node.target if isinstance(node.target, str) else node.target.__name__}; "
                                "residual connections, branches and attention are not supported)")
    missing = [name for name in layers if name not in order]
    if missing:
        raise UserError(f"{key}: fedma cannot match {what}: layer {missing[0]!r} is never called in its forward")
    return [(name, layers[name]) for name in order]


def resize_to(model: nn.Module, arrays: dict[str, torch.Tensor]) -> None:
    """Give the model's conv/linear layers the shapes of `arrays` (state_dict names)
    where they differ, keeping each parameter's device, dtype and `requires_grad`;
    the values are not copied (load them after). A layer's forward reads its weight's
    shape, so a wider layer only needs wider parameters (and its size attributes,
    kept true for printing and for `layer_chain`)."""
    for name, value in arrays.items():
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        current = getattr(module, attr)
        if current is None or current.shape == value.shape:
            continue
        if type(module) not in (nn.Conv2d, nn.Linear):
            raise ValueError(f"{name}: only Conv2d and Linear layers change width, {owner!r} is {type(module).__name__}")
        wider = nn.Parameter(torch.empty(value.shape, dtype=current.dtype, device=current.device),
                             requires_grad=current.requires_grad)
        setattr(module, attr, wider)
        if attr == "weight":
            if isinstance(module, nn.Conv2d):
                module.out_channels, module.in_channels = value.shape[0], value.shape[1]
            else:
                module.out_features, module.in_features = value.shape[0], value.shape[1]
