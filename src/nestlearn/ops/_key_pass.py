"""A deep-memory chunk's key pass as one autograd node with a written backward.

The key pass runs the chunk's keys through the chunk-start weights and back (``ops/README.md``,
"Gradients as rank-1 outer products"): with z_l = a_l W_l^T, a_0 = k, a_l = act(z_{l-1}),

    e_{L-1} = k + z_{L-1} - v   (l2 objective)   or   -v   (dot),
    e_{l-1} = (e_l W_l) * act'(z_{l-1}),

and returns the layer inputs a_l, the output errors e_l and z_0 (the delta rule reads it).
Its outputs feed the read-out, the delta rule and the state step, so the outer loss
differentiates through these inner gradients: the backward needs act''.

Why one node: autograd records about 30 nodes per chunk for a 2-layer memory (each ``@`` on
``[B, H, C, D]`` tensors six of them), once per chunk per memory per block. Written out, with
incoming gradients gA_l, gE_l, gZ_0, the backward first walks the error chain from e_0 up,

    gU = gE_{l-1} * act'(z_{l-1}),   gZ_{l-1} += gE_{l-1} * (e_l W_l) * act''(z_{l-1}),
    gE_l += gU W_l^T,   gW_l += e_l^T gU,

then the objective (l2: gk += gE_{L-1}, gZ_{L-1} += gE_{L-1}; gv = -gE_{L-1}), then the MLP
down from the last layer, gW_l += gZ_l^T a_l, gA_l += gZ_l W_l, gZ_{l-1} += gA_l * act'(z_{l-1}),
and gk += gA_0. ``tests/test_ops_key_pass.py`` ties it to autograd of the plain pass in float64.
First order only, like the other written nodes.
"""

from __future__ import annotations

from typing import Any

import torch

from nestlearn.ops._chunk_read import through_activation
from nestlearn.ops._deep_memory_common import (
    ACTIVATIONS,
    accumulate,
    activation_slope,
    apply_weight,
    sum_to_shape,
)
from nestlearn.ops._first_order import check_first_order

KeyPass = tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]


def key_pass_reference(weights: list[torch.Tensor], keys: torch.Tensor, values: torch.Tensor,
                       objective: str, activation: str) -> KeyPass:
    """The key pass as plain differentiable ops: per layer the inputs a_l and output errors
    e_l (token i's gradient of layer l is e_{l,i} a_{l,i}^T), and z_0 = W_1 k."""
    act = ACTIVATIONS[activation][0]
    inputs, pres = [], []
    hidden = keys
    for index, weight in enumerate(weights):
        pre = apply_weight(hidden, weight)
        inputs.append(hidden)
        pres.append(pre)
        hidden = act(pre) if index < len(weights) - 1 else pre
    # dl/dM(k): M(k) - v for the L2 objective, -v for the dot objective
    error = keys + hidden - values if objective == "l2" else -values
    errors = [error]
    for index in range(len(weights) - 1, 0, -1):
        error = (error @ weights[index]) * activation_slope(pres[index - 1], activation)
        errors.append(error)
    errors.reverse()
    return inputs, errors, pres[0]


def key_pass(weights: list[torch.Tensor], keys: torch.Tensor, values: torch.Tensor,
             objective: str, activation: str) -> KeyPass:
    """:func:`key_pass_reference` as one node with the backward of the module docstring."""
    layers = len(weights)
    outputs = _KeyPass.apply(objective, activation, layers, keys, values, *weights)
    inputs = [keys, *outputs[:layers - 1]]
    errors = list(outputs[layers - 1:2 * layers - 1])
    return inputs, errors, outputs[-1]


class _KeyPass(torch.autograd.Function):
    """``(objective, activation, L, k, v, W_1..W_L) -> (a_1..a_{L-1}, e_0..e_{L-1}, z_0)``."""

    @staticmethod
    def forward(ctx: Any, objective: str, activation: str, layers: int, keys: torch.Tensor,
                values: torch.Tensor, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
        act, slope = ACTIVATIONS[activation][0], ACTIVATIONS[activation][1]
        inputs, pres = [keys], []
        hidden = keys
        for index, weight in enumerate(weights):
            pre = apply_weight(hidden, weight)
            pres.append(pre)
            hidden = act(pre) if index < layers - 1 else pre
            if index < layers - 1:
                inputs.append(hidden)
        error = keys + hidden - values if objective == "l2" else -values
        errors, through, slopes = [error], [], []
        for index in range(layers - 1, 0, -1):
            carried = error @ weights[index]  # e_l W_l
            rate = slope(pres[index - 1])
            error = carried * rate
            through.append(carried)
            slopes.append(rate)
            errors.append(error)
        errors.reverse()
        through.reverse()  # through[l - 1] = e_l W_l
        slopes.reverse()  # slopes[l - 1] = act'(z_{l-1})
        ctx.objective, ctx.activation, ctx.layers = objective, activation, layers
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(*weights, *inputs, *pres[:-1], *errors, *through, *slopes)
        return (*inputs[1:], *errors, pres[0])

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        check_first_order("the deep memory's key pass")
        layers = ctx.layers
        saved = list(ctx.saved_tensors)
        weights, saved = saved[:layers], saved[layers:]
        inputs, saved = saved[:layers], saved[layers:]
        pres, saved = saved[:layers - 1], saved[layers - 1:]
        errors, saved = saved[:layers], saved[layers:]
        through, slopes = saved[:layers - 1], saved[layers - 1:]
        curvature = ACTIVATIONS[ctx.activation][2]
        grad_in: list[torch.Tensor | None] = [None, *grads[:layers - 1]]
        grad_err: list[torch.Tensor | None] = list(grads[layers - 1:2 * layers - 1])
        grad_pre: list[torch.Tensor | None] = [grads[-1]] + [None] * (layers - 1)
        grad_w: list[torch.Tensor | None] = [None] * layers
        grad_keys = grad_values = None
        # the error chain, from e_0 (made last) up to e_{L-1}
        for index in range(1, layers):
            incoming = grad_err[index - 1]
            if incoming is None:
                continue
            grad_through = incoming * slopes[index - 1]
            grad_pre[index - 1] = accumulate(
                grad_pre[index - 1], incoming * through[index - 1] * curvature(pres[index - 1]))
            weight = weights[index]
            grad_err[index] = accumulate(grad_err[index], grad_through @ weight.transpose(-1, -2))
            grad_w[index] = accumulate(grad_w[index],
                                       errors[index].transpose(-1, -2) @ grad_through)
        # the objective: e_{L-1} = k + z_{L-1} - v (l2) or -v (dot)
        last = grad_err[layers - 1]
        if last is not None:
            grad_values = -last
            if ctx.objective == "l2":
                grad_keys = last
                grad_pre[layers - 1] = accumulate(grad_pre[layers - 1], last)
        # the MLP, down from the last layer
        for index in range(layers - 1, -1, -1):
            grad = grad_pre[index]
            total = grad_in[index]  # the a_l a later user differentiated (None for k)
            if grad is not None:
                grad_w[index] = accumulate(grad_w[index], grad.transpose(-1, -2) @ inputs[index])
                total = accumulate(total, grad @ weights[index])
            if total is None:
                continue
            if index > 0:
                grad_pre[index - 1] = accumulate(grad_pre[index - 1], through_activation(
                    ctx.activation, total, pres[index - 1], inputs[index]))
            else:
                grad_keys = accumulate(grad_keys, total)
        grad_weights = [None if g is None else sum_to_shape(g, w)
                        for g, w in zip(grad_w, weights, strict=True)]
        return (None, None, None, grad_keys, grad_values, *grad_weights)
