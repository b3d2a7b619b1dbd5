"""E(x) and ∇ₓE(x) of a sequential network with frozen weights, in one hand-written pass.

Sampling runs the energy's network forward and then backward to the input, thousands of times, with the
weights fixed. Autograd pays per step for what that does not need: it records a graph of every operation,
dispatches each backward node through its engine, and (with :mod:`ebm.fastconv`) a Python
``TorchFunctionMode`` and an autograd ``Function`` per convolution. Measured on the 28×28 CNN at batch
128 (``benchmarks/sampling.py``, anatomy table) that overhead was ~3 ms of an ~11 ms Langevin step, on
top of the arithmetic.

For a network that is a plain chain of :class:`~torch.nn.Conv2d`, :class:`~torch.nn.Linear`,
:class:`~torch.nn.SiLU`, :class:`~torch.nn.ReLU` and :class:`~torch.nn.Flatten` (nested
:class:`~torch.nn.Sequential` included), :func:`value_and_input_grad` runs the chain forward keeping only
what the input gradient needs (each convolution's input, each SiLU's input, each ReLU's output), and then
the chain rule by hand in reverse: ``silu_backward`` (``threshold_backward`` for a ReLU),
``∂y Wᵀ`` for a linear layer, and a convolution's input gradient by GEMM + col2im for few input channels
or oneDNN's backward-data kernel otherwise, all in channels_last (see :mod:`ebm.fastconv`). No autograd
graph is built; nothing touches the parameters' ``.grad``.

:func:`sequential_layers` says whether a network qualifies; energies that do expose a
``frozen_energy_and_grad`` method (see :mod:`ebm.energies`), and :func:`ebm.energies.energy_and_grad`
uses it on the CPU when no parameter requires gradients (inside :func:`ebm.energies.frozen`, as in the
samplers). Anything else — other layers, hooks, gradients wanted for the weights, CUDA — takes the
autograd path, with the same values.
"""

from __future__ import annotations

import collections
import weakref
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ebm import fastconv

# (output of the network) → (energies (B,), ∂E/∂output)
Head = Callable[[Tensor], tuple[Tensor, Tensor]]

_SUPPORTED = (nn.Conv2d, nn.Linear, nn.SiLU, nn.ReLU, nn.Flatten)
_PASSES: collections.Counter[str] = collections.Counter()


def pass_counts() -> dict[str, int]:
    """How many hand-written passes ran in this process, by network kind (a diagnostic for tests)."""
    return dict(_PASSES)


def has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` itself has forward or backward hooks, which the hand-written pass would skip."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
    )


def _plain_supported(layer: nn.Module) -> bool:
    """One of the supported layer types, with that type's own forward (a parametrised layer — spectral
    norm — is of a generated subclass that keeps it; a user's subclass with its own forward is not)."""
    return any(isinstance(layer, kind) and type(layer).forward is kind.forward for kind in _SUPPORTED)


def sequential_layers(net: nn.Module) -> list[nn.Module] | None:
    """``net``'s layers in order if it is a chain the hand-written pass can run, else ``None``.

    Qualifies: a :class:`~torch.nn.Sequential` (nested ones flattened; or a module whose ``forward`` is
    exactly the ``Sequential`` its ``as_sequential()`` method returns) of ``Conv2d`` (zero padding given
    as numbers, one group), ``Linear``, ``SiLU``, ``ReLU`` and ``Flatten``. Spectrally normalised
    layers qualify: their weight is read through the parametrisation, as their forward reads it.
    """
    if not isinstance(net, nn.Sequential):
        as_sequential = getattr(net, "as_sequential", None)
        if as_sequential is None:
            return None
        net = as_sequential()
    if not isinstance(net, nn.Sequential):
        return None
    layers: list[nn.Module] = []
    for layer in net:
        if isinstance(layer, nn.Sequential):
            inner = sequential_layers(layer)
            if inner is None:
                return None
            layers += inner
            continue
        if not _plain_supported(layer):
            return None
        if isinstance(layer, nn.Conv2d) and (
            layer.groups != 1 or layer.padding_mode != "zeros" or isinstance(layer.padding, str)
        ):
            return None
        layers.append(layer)
    return layers


_LAYERS: weakref.WeakKeyDictionary[nn.Module, list[nn.Module] | None] = weakref.WeakKeyDictionary()


def cached_sequential_layers(net: nn.Module) -> list[nn.Module] | None:
    """:func:`sequential_layers`, looked up once per network object (a layer added later is not seen;
    hooks are checked on every call, by :func:`usable`)."""
    if net not in _LAYERS:
        _LAYERS[net] = sequential_layers(net)
    return _LAYERS[net]


def usable(module: nn.Module, x: Tensor) -> bool:
    """Whether the hand-written pass may run ``module`` on ``x``: the CPU without autocast, float32/64,
    no parameter that requires gradients, no module with hooks (they would not be called), and the fast
    paths not :func:`ebm.fastconv.disabled`."""
    return (
        fastconv.enabled()
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and not torch.is_autocast_enabled("cpu")
        and not any(p.requires_grad for p in module.parameters())
        and not any(has_hooks(m) for m in module.modules())
    )


def value_and_input_grad(layers: Sequence[nn.Module], x: Tensor, head: Head) -> tuple[Tensor, Tensor]:
    """``(E(x), ∇ₓE(x))`` for ``E = head ∘ layers`` without autograd; ``x`` of any shape the chain takes.

    Args:
        layers: from :func:`sequential_layers`.
        x: the network's input batch.
        head: maps the chain's output to the energies ``(B,)`` and their gradient with respect to that
            output.

    Returns:
        The energies and the gradient, shaped and laid out like ``x``, both free of autograd history.
    """
    with torch.no_grad():
        saved: list[Any] = []
        h = x
        for layer in layers:
            if isinstance(layer, nn.Conv2d):
                weight = fastconv.channels_last(layer.weight)
                h = fastconv.channels_last(h)
                saved.append((weight, h))
                h = torch.conv2d(h, weight, layer.bias, layer.stride, layer.padding, layer.dilation)
            elif isinstance(layer, nn.Linear):
                weight = layer.weight
                saved.append(weight)
                h = F.linear(h, weight, layer.bias)
            elif isinstance(layer, nn.SiLU):
                saved.append(h)
                h = F.silu(h)
            elif isinstance(layer, nn.ReLU):
                h = F.relu(h)
                saved.append(h)  # the output: its zeros are where the gradient stops
            else:  # Flatten
                saved.append(h.shape)
                h = layer(h)
        energy, grad = head(h)
        for layer, kept in zip(reversed(layers), reversed(saved), strict=True):
            if isinstance(layer, nn.Conv2d):
                weight, h = kept
                # nn.Conv2d keeps all three as pairs (numeric padding: sequential_layers turned strings away)
                pairs = (layer.stride, layer.padding, layer.dilation)
                stride, padding, dilation = (cast(tuple[int, int], pair) for pair in pairs)
                grad = fastconv.input_grad(grad, weight, h, h.shape, stride, padding, dilation)
            elif isinstance(layer, nn.Linear):
                grad = grad @ kept
            elif isinstance(layer, (nn.SiLU, nn.ReLU)):
                if kept.ndim == 4:  # the convolutions' channels_last, so the backward reads one format
                    grad = fastconv.channels_last(grad)
                if isinstance(layer, nn.SiLU):
                    grad = torch.ops.aten.silu_backward(grad, kept)
                else:
                    grad = torch.ops.aten.threshold_backward(grad, kept, 0)
            else:
                grad = grad.reshape(kept)
        if grad.stride() != x.stride():  # as autograd returns it: in x's memory format
            grad = torch.empty_like(x).copy_(grad)
        return energy, grad


def count(kind: str) -> None:
    """Record one hand-written pass of ``kind`` (see :func:`pass_counts`)."""
    _PASSES[kind] += 1
