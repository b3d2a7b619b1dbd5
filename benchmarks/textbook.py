"""The textbook's Langevin loop, re-implemented faithfully in PyTorch as the benchmarks' baseline.

The reference is the ``langevin_dynamics`` method of the tch-rs energy-based model in *Deep Learning via
Rust* (DLVR), chapter 13 (a copy lives at ``/work/shared/seed/000_77d56f6189ac5d21.txt``). Its ideas,
kept here one for one because they are what costs time:

* the model is used as it is during training: parameters keep ``requires_grad``, the module stays in
  train mode, so every backward pass also computes (and accumulates into ``param.grad``) the weight
  gradients the sampler never uses;
* the gradient is taken by ``backward()`` on the **mean** energy of the batch and read from the chain's
  ``.grad``, which is zeroed first;
* the update ``x ← x − s · ∇ₓ mean(E) + √(2s) · ξ`` is written out of place, recorded by autograd, and
  the result is detached into a fresh leaf that requires grad for the next step.

Because the gradient is that of the mean, each chain moves by ``s/B · ∇ₓE(xᵢ)``: the textbook's
effective step size shrinks with the batch size B while its noise does not. The same chain from the
library is therefore ``Langevin(step_size=s / B, noise_scale=√(2s))`` (:func:`library_equivalent`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ebm.samplers import Langevin


def textbook_langevin(
    model: nn.Module, x: Tensor, n_steps: int, step_size: float, *, noise: Tensor | None = None
) -> Tensor:
    """Run the textbook's loop for ``n_steps`` from ``x``; return the detached final chains.

    Args:
        model: an energy ``(B, *event) → (B,)`` whose parameters require gradients (they get ``.grad``).
        x: starting chains ``(B, *event)``.
        n_steps: Langevin steps.
        step_size: s, applied to the gradient of the mean energy; the noise is √(2s) · ξ.
        noise: pre-drawn ξ, shape ``(n_steps, *x.shape)``; ``None`` draws ``torch.randn_like`` each step
            from the global generator, as the textbook does.
    """
    chains = x.clone().requires_grad_(True)
    for step in range(n_steps):
        if chains.grad is not None:  # the textbook's zero_grad on the chain tensor
            chains.grad.zero_()
        energy = model(chains)
        energy.mean().backward()
        assert chains.grad is not None
        grad = chains.grad.detach()
        xi = torch.randn_like(chains) if noise is None else noise[step]
        chains = chains - grad * step_size + xi * math.sqrt(2 * step_size)
        chains = chains.detach().requires_grad_(True)
    return chains.detach()


def library_equivalent(step_size: float, batch_size: int) -> Langevin:
    """The library sampler whose chain is :func:`textbook_langevin`'s for ``step_size`` at this batch size."""
    return Langevin(step_size=step_size / batch_size, noise_scale=math.sqrt(2 * step_size))
