"""How much the model's loss cares about each FFN's output: one backward pass over calibration text.

A change ``dy`` of an FFN's output on a token changes the loss by about ``g . dy`` (``g`` the
loss's gradient with respect to that output), and over many tokens by about ``1/2 E[(g . dy)^2]``:
the Fisher approximation of the loss's curvature. Folding neuron i changes the output by
``dh_i w_i`` (``w_i`` its output column), so its expected cost in loss is about
``E[dh_i^2] * w_i^T F w_i`` with ``F = E[g g^T]`` over the tokens, assuming the error and the
gradient are independent. ``w_i^T F w_i`` replaces the plain ``||w_i||^2`` as the neuron's error
weight: errors of every FFN are then in one unit (loss), so one price per byte across all FFNs
(``allocation="loss"``) spends the budget where the model loses least, and within an FFN the
neurons whose outputs the loss ignores go first.

Measured on the model's own next-token loss (causal LMs: ``labels=input_ids``) or, for models
without a loss, on the squared norm of their output (a self-distillation proxy). Each probe
adds a scalar zero leaf to the FFN output so autograd tracks the path to the loss without any
of the model's weights taking a gradient.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Iterable, Sequence

import torch
from torch.fx import GraphModule

from ..passes.context import copy_graph_module, placeholder_fqns
from ..passes.find_ffns import find_ffns, linear_nodes


class OutputGradients:
    """Per FFN, the sum of ``g g^T`` (float64, d_out x d_out) and how many tokens it holds."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self.leaves: list[torch.Tensor] = []  # the current batch's probe leaves

    def add(self, name: str, grad: torch.Tensor) -> None:
        g = grad.detach().reshape(-1, grad.shape[-1]).float()
        outer = (g.t() @ g).double()
        self.sums[name] = self.sums[name] + outer if name in self.sums else outer
        self.tokens[name] = self.tokens.get(name, 0) + g.shape[0]

    def fisher(self, name: str) -> torch.Tensor:
        """E[g g^T] of FFN ``name``'s output."""
        return self.sums[name] / max(self.tokens[name], 1)

    def neuron_weights(self, name: str, out_rows: torch.Tensor) -> torch.Tensor:
        """``w_i^T F w_i`` per neuron (out_rows: (m, d_out)), float64.

        Example:
            >>> grads = OutputGradients(); grads.add("mlp", torch.tensor([[1.0, 0.0]]))
            >>> grads.neuron_weights("mlp", torch.tensor([[2.0, 5.0], [0.0, 1.0]])).tolist()
            [4.0, 0.0]
        """
        w = out_rows.double()
        return ((w @ self.fisher(name)) * w).sum(1)


class _Active(threading.local):
    def __init__(self) -> None:
        self.gradients: OutputGradients | None = None


_ACTIVE = _Active()


class _Probe(torch.autograd.Function):
    """Identity whose backward hands the output gradient to the active ``OutputGradients``."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, name: str) -> torch.Tensor:
        ctx.name = name
        return y.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if _ACTIVE.gradients is not None:
            _ACTIVE.gradients.add(ctx.name, grad)
        return grad, None


def probe_ffn_output(y: torch.Tensor, name: str) -> torch.Tensor:
    """Graph hook after an FFN's output: a tracked identity (see the module docstring)."""
    if _ACTIVE.gradients is None:
        return y
    leaf = torch.zeros((), dtype=y.dtype, device=y.device, requires_grad=True)
    _ACTIVE.gradients.leaves.append(leaf)
    return _Probe.apply(y + leaf, name)


def _probing_backend(gm: GraphModule, example_inputs: Sequence[Any], **_) -> Callable:
    """Backend that runs the graph eagerly with ``probe_ffn_output`` after every FFN."""
    gm = copy_graph_module(gm)
    matches, _ = find_ffns(gm, placeholder_fqns(gm))
    for match in matches:
        out = linear_nodes(match)[-1]
        users = list(out.users)
        with gm.graph.inserting_after(out):
            probed = gm.graph.call_function(probe_ffn_output, (out, match.name))
        for user in users:
            user.replace_input_with(out, probed)
    gm.recompile()
    return gm.forward


PROBING_BACKEND = _probing_backend


def output_gradients(model: torch.nn.Module, batches: Iterable[Any]) -> OutputGradients:
    """Run ``batches`` forward and backward and collect every FFN's ``E[g g^T]``. The model's
    weights get no gradient and are not modified.

    Example:
        >>> import torch
        >>> mlp = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8)).eval()
        >>> grads = output_gradients(mlp, [torch.randn(16, 8)])
        >>> grads.fisher("").shape, grads.tokens[""]
        (torch.Size([8, 8]), 16)
    """
    compiled = torch.compile(model, backend=PROBING_BACKEND, dynamic=None)
    gradients = OutputGradients()
    _ACTIVE.gradients = gradients
    try:
        with torch.enable_grad():
            for batch in batches:
                gradients.leaves = []
                loss = _loss(compiled, batch)
                if gradients.leaves:
                    torch.autograd.backward(loss, inputs=gradients.leaves)
                gradients.leaves = []
    finally:
        _ACTIVE.gradients = None
    return gradients


def _loss(model, batch) -> torch.Tensor:
    """Summed next-token NLL for a causal LM on token ids; else half the output's squared norm."""
    if isinstance(batch, torch.Tensor) and not batch.is_floating_point():
        out = model(batch)
        logits = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, tuple) else out
        if logits.dim() == 3 and logits.shape[-1] > 1 and batch.dim() == 2:
            return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(),
                                                     reduction="sum")
        return logits.float().square().sum() / 2
    out = model(**batch) if isinstance(batch, dict) else model(*batch) if isinstance(batch, (list, tuple)) \
        else model(batch)
    y = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0] if isinstance(out, tuple) else out
    return y.float().square().sum() / 2
