"""MAML's inner loop on torch.func: learn2learn's tiny surface, without module cloning.

learn2learn (Arnold et al. 2020) makes MAML two calls: `learner = maml.clone()` and
`learner.adapt(loss)`. Here the same surface is built on
`torch.func.functional_call` and `torch.func.grad`: a `FunctionalLearner` is a
module's parameters as a plain dict, and adapting it is one functional SGD step,
`params - lr * grad(loss)(params)`. The module's own weights are never touched, so
adapting a copy for one client cannot leak into the next.

    maml = MAML(model, lr=0.01)
    learner = maml.clone()                                  # the model's weights, detached
    learner.adapt(lambda f: F.cross_entropy(f(x), y))       # one inner step
    logits = learner(x_query)

A loss is a function of `forward` (the model called with the learner's weights), so
it can be any objective, not only cross-entropy. Per-FedAvg's Hessian-free variant
needs a Hessian-vector product; `hvp` computes it exactly (forward-over-reverse,
`torch.func.jvp` of `grad`) or by the finite difference the paper uses.

Buffers (BatchNorm's running statistics) are passed to every call, not differentiated;
in training mode a forward pass updates them in place, as ordinary training does.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, grad_and_value, jvp

Params = dict[str, torch.Tensor]
Forward = Callable[[torch.Tensor], torch.Tensor]
Loss = Callable[[Forward], torch.Tensor]  # a loss of the model's forward function


def cross_entropy(x: torch.Tensor, y: torch.Tensor) -> Loss:
    """The cross-entropy loss of a labeled batch, as a `Loss`."""
    return lambda forward: F.cross_entropy(forward(x), y)


class FunctionalLearner:
    """A module's parameters as a dict, adapted functionally (learn2learn's cloned learner).

    Args:
        module: supplies the architecture only; its own weights are never used or changed.
        params: the parameters (named as in `module.named_parameters()`).
        buffers: the buffers, passed along to every call.
        lr: the inner step size.
    """

    def __init__(self, module: nn.Module, params: Params, buffers: Params, lr: float):
        self.module, self.params, self.buffers, self.lr = module, params, buffers, lr

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.module, (self.params, self.buffers), (x,))

    def _loss_of(self, loss: Loss) -> Callable[[Params, Params], torch.Tensor]:
        return lambda params, buffers: loss(lambda x: functional_call(self.module, (params, buffers), (x,)))

    def grad(self, loss: Loss, params: Params | None = None) -> Params:
        """The gradient of `loss` at `params` (default: this learner's)."""
        return grad(self._loss_of(loss))(self.params if params is None else params, self.buffers)

    def grad_and_value(self, loss: Loss) -> tuple[Params, torch.Tensor]:
        """The gradient of `loss` at this learner's params, and the loss itself."""
        return grad_and_value(self._loss_of(loss))(self.params, self.buffers)

    def clone(self) -> FunctionalLearner:
        """Another learner starting from the same weights (they are immutable: adapting
        creates new tensors, so the two never affect each other)."""
        return FunctionalLearner(self.module, dict(self.params), self.buffers, self.lr)

    def adapt(self, loss: Loss, lr: float | None = None) -> FunctionalLearner:
        """One SGD step on `loss`: params <- params - lr * grad. Returns self."""
        step = self.lr if lr is None else lr
        gradient = self.grad(loss)
        self.params = {name: p - step * gradient[name] for name, p in self.params.items()}
        return self

    def hvp(self, loss: Loss, vector: Params, delta: float | None = None) -> Params:
        """The Hessian of `loss` at this learner's params times `vector`.

        Exact (`delta` None): forward-mode differentiation of the gradient, one jvp
        (for modules without running statistics, or in eval mode: a jvp cannot see
        buffers updated in place). With `delta`: the central finite difference
        (grad(w + delta v) - grad(w - delta v)) / (2 delta), Per-FedAvg's Hessian-free
        estimate (Fallah et al. 2020, Sec. 4), exact up to O(delta^2).
        """
        if delta is None:
            gradient = grad(self._loss_of(loss))
            return jvp(lambda p: gradient(p, self.buffers), (self.params,), (vector,))[1]
        plus = {n: p + delta * vector[n] for n, p in self.params.items()}
        minus = {n: p - delta * vector[n] for n, p in self.params.items()}
        g_plus, g_minus = self.grad(loss, plus), self.grad(loss, minus)
        return {n: (g_plus[n] - g_minus[n]) / (2 * delta) for n in self.params}

    def arrays(self) -> Params:
        """Parameters and buffers under their state_dict names (detached)."""
        return {n: t.detach() for n, t in (self.params | self.buffers).items()}


class MAML:
    """learn2learn's `MAML` wrapper on torch.func: `clone()` gives a `FunctionalLearner`.

    Args:
        module: the model (architecture and, by default, starting weights).
        lr: the inner (adaptation) step size.
    """

    def __init__(self, module: nn.Module, lr: float):
        self.module, self.lr = module, lr

    def clone(self, arrays: Params | None = None) -> FunctionalLearner:
        """A learner from `arrays` (state_dict names), or by default from the module's
        current weights. Parameters are detached. Without `arrays` the module's own
        buffers are used, so that training updates its running statistics as ordinary
        training would; from `arrays` they are copied, so that adapting never changes
        the arrays given (the global model's)."""
        param_names = {name for name, _ in self.module.named_parameters()}
        if arrays is None:
            params = {n: p.detach() for n, p in self.module.named_parameters()}
            return FunctionalLearner(self.module, params, dict(self.module.named_buffers()), self.lr)
        params = {n: v.detach() for n, v in arrays.items() if n in param_names}
        buffers = {n: v.detach().clone() for n, v in arrays.items() if n not in param_names}
        return FunctionalLearner(self.module, params, buffers, self.lr)


def adapt_arrays(module: nn.Module, arrays: Params, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                 lr: float) -> Params:
    """`arrays` after one SGD step of cross-entropy per labeled batch, in training mode
    (a personalized model from the global one: Per-FedAvg's and Reptile's evaluation)."""
    was_training = module.training
    module.train()
    try:
        learner = MAML(module, lr).clone(arrays)
        for x, y in batches:
            learner.adapt(cross_entropy(x, y))
        return arrays | learner.arrays()
    finally:
        module.train(was_training)
