"""Convolutions with frozen weights, as Langevin sampling runs them: forward plus the input gradient only.

A sampler step needs ``E(x)`` and ``∇ₓE(x)`` with the weights held fixed. Autograd's convolution then
still runs PyTorch's generic backward for the input gradient, in whatever memory format the tensors
happen to have. Measured on a 2-core AVX-512 CPU (``benchmarks/sampling.py``, anatomy table), two
things are much faster for the small convolutions of image EBMs:

* **channels_last for input and weight.** oneDNN's direct convolutions vectorise over channels; in
  NCHW, or with only the activations in channels_last, PyTorch reorders or takes a slower kernel.
  A one-channel weight such as ``(32, 1, 5, 5)`` counts as channels_last whatever its strides, so it is
  restrided explicitly (otherwise the output comes back NCHW on the slow path).
* **the input gradient of a convolution with few input channels as one GEMM plus col2im**:
  ``∂x = col2im(∂y · W)`` with ``W`` the ``(C_out, C_in·kh·kw)`` weight matrix, and col2im a
  ``scatter_add_`` that both threads share. oneDNN's backward-data kernel for one input channel runs at
  a few GFLOP/s (it cannot fill a vector register along ``C_in``); the GEMM has ``K = C_out`` and runs
  several times faster, col2im included.

:class:`FrozenConvolutions` is a :class:`~torch.overrides.TorchFunctionMode` that routes every
``conv2d`` whose weight and bias do not require gradients (as inside :func:`ebm.energies.frozen`)
through :class:`FrozenWeightConv2d`, an autograd function that computes no weight gradient and keeps
nothing for one beyond what the input gradient needs. A convolution it
cannot take (grouped, unbatched, not on the CPU, ...) runs unchanged, and the reason is counted in
:func:`fallback_counts` and logged once. Convolutions whose weights require gradients (training)
always run unchanged: they need the weight gradient.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import functools
import logging
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

# Input gradients of convolutions with at most this many input channels go through GEMM + col2im; above
# it oneDNN's backward-data kernel wins. Measured (batch 128, 2 threads, ms, oneDNN vs GEMM + col2im):
# C_in = 1, 5×5 stride 2 on 28 px: 3.80 vs 1.11; C_in = 3, 3×3 on 32 px: 13.6 vs 10.2 (stride 1), 3.73 vs
# 1.86 (stride 2); C_in = 8 on 16 px: 3.76 vs 5.48 (stride 1), 1.06 vs 0.67 (stride 2); C_in = 16: 1.09 vs
# 2.01 (stride 2); each a median of 40 calls on random channels_last tensors, 2026-12-03.
GEMM_INPUT_GRAD_MAX_IN_CHANNELS = 4

# Calls per route in this process: "forward", "input grad by GEMM + col2im", "input grad by oneDNN", and
# "ordinary path: <reason>" for the frozen-weight calls this module could not take.
_ROUTES: collections.Counter[str] = collections.Counter()
_FALLBACK = "ordinary path: "
_ENABLED = contextvars.ContextVar("ebm_fastconv_enabled", default=True)


def route_counts() -> dict[str, int]:
    """How often each route ran in this process (a diagnostic for tests and benchmarks)."""
    return dict(_ROUTES)


def fallback_counts() -> dict[str, int]:
    """How often a frozen-weight ``conv2d`` ran on PyTorch's ordinary path, by reason, in this process."""
    return {key.removeprefix(_FALLBACK): n for key, n in _ROUTES.items() if key.startswith(_FALLBACK)}


def _record_fallback(reason: str) -> None:
    if _FALLBACK + reason not in _ROUTES:
        logger.info("frozen-weight conv2d on PyTorch's ordinary path: %s", reason)
    _ROUTES[_FALLBACK + reason] += 1


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if len(value) == 1:  # torch.conv2d broadcasts a one-element list to both dimensions
        return int(value[0]), int(value[0])
    first, second = value
    return int(first), int(second)


def channels_last(tensor: Tensor) -> Tensor:
    """``tensor`` (4-D) with channels_last strides, copied only if its strides are not already so.

    Unlike ``tensor.contiguous(memory_format=torch.channels_last)``, this also restrides tensors with
    one channel, which PyTorch counts as contiguous in both formats but convolves as NCHW.
    """
    _, channels, height, width = tensor.shape
    strides = (height * width * channels, 1, width * channels, channels)
    if tensor.stride() == strides:
        return tensor
    storage = torch.empty(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    return storage.as_strided(tensor.shape, strides).copy_(tensor)


@functools.lru_cache(maxsize=64)
def _scatter_index(
    in_channels: int,
    kernel: tuple[int, int],
    out_size: tuple[int, int],
    padded_size: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
    device: torch.device,
) -> Tensor:
    """Where each column entry of :func:`input_grad_by_gemm` lands in the zero-padded input, flattened:
    entry ``(oh, ow, c, i, j)`` goes to ``(c, oh·sh + i·dh, ow·sw + j·dw)``. Shape ``(1, Ho·Wo·C·kh·kw)``."""
    (kh, kw), (ho, wo), (hp, wp) = kernel, out_size, padded_size
    oh = torch.arange(ho).view(ho, 1, 1, 1, 1) * stride[0]
    ow = torch.arange(wo).view(1, wo, 1, 1, 1) * stride[1]
    c = torch.arange(in_channels).view(1, 1, in_channels, 1, 1)
    i = torch.arange(kh).view(1, 1, 1, kh, 1) * dilation[0]
    j = torch.arange(kw).view(1, 1, 1, 1, kw) * dilation[1]
    return (c * (hp * wp) + (oh + i) * wp + (ow + j)).reshape(1, -1).to(device)


def input_grad_by_gemm(
    grad_out: Tensor,
    weight: Tensor,
    input_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> Tensor:
    """∂x of ``y = conv2d(x, W)`` from ∂y: one GEMM ``∂y · W`` into columns, then a scatter-add of the
    columns into the zero-padded input (col2im), cropped.

    PyTorch's own col2im (``F.fold``) walks the batch one image at a time on one thread (1.2 ms of CNN28's
    ~14 ms step at batch 128); ``scatter_add_`` along each image's row splits the batch between the
    threads. The GEMM reads ∂y as a ``(B·H'·W', C_out)`` matrix, free in channels_last.

    Args:
        grad_out: ∂y, ``(B, C_out, H', W')``, any memory format.
        weight: ``(C_out, C_in, kh, kw)``.
        input_size: ``(H, W)`` of x.

    Returns:
        ∂x, ``(B, C_in, H, W)``, contiguous.
    """
    batch, out_channels, out_h, out_w = grad_out.shape
    in_channels, kh, kw = weight.shape[1:]
    height, width = input_size
    padded = (height + 2 * padding[0], width + 2 * padding[1])
    columns = grad_out.permute(0, 2, 3, 1).reshape(-1, out_channels) @ weight.reshape(out_channels, -1)
    index = _scatter_index(in_channels, (kh, kw), (out_h, out_w), padded, stride, dilation, grad_out.device)
    grad_padded = grad_out.new_zeros(batch, in_channels * padded[0] * padded[1])
    # the row length spelled out: view(batch, -1) cannot infer it for an empty batch
    grad_padded.scatter_add_(1, index.expand(batch, -1), columns.view(batch, index.shape[1]))
    grad_padded = grad_padded.view(batch, in_channels, *padded)
    return grad_padded[:, :, padding[0] : padding[0] + height, padding[1] : padding[1] + width].contiguous()


def input_grad(
    grad_out: Tensor,
    weight_cl: Tensor,
    x_cl: Tensor | None,
    input_shape: Sequence[int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
) -> Tensor:
    """∂x of ``y = conv2d(x, W)`` (channels_last ``weight_cl``) from ∂y by the faster route for its
    input channels: :func:`input_grad_by_gemm` for at most :data:`GEMM_INPUT_GRAD_MAX_IN_CHANNELS` (``x_cl``
    may then be ``None``), else oneDNN's backward-data kernel in channels_last on the input ``x_cl``."""
    if input_shape[1] <= GEMM_INPUT_GRAD_MAX_IN_CHANNELS:
        size = (input_shape[2], input_shape[3])
        return input_grad_by_gemm(grad_out, weight_cl, size, stride, padding, dilation)
    return torch.ops.aten.convolution_backward(
        channels_last(grad_out), x_cl, weight_cl, None, list(stride), list(padding), list(dilation), False,
        [0, 0], 1, [True, False, False],
    )[0]  # fmt: skip


class FrozenWeightConv2d(torch.autograd.Function):
    """``conv2d`` for weights that need no gradient: channels_last forward, input gradient only.

    The backward pass takes the input gradient by :func:`input_grad_by_gemm` for at most
    :data:`GEMM_INPUT_GRAD_MAX_IN_CHANNELS` input channels (it keeps only the weight) and by oneDNN's
    backward-data kernel in channels_last otherwise (it keeps the weight and the channels_last input).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
    ) -> Tensor:
        _ROUTES["forward"] += 1
        weight_cl, x_cl = channels_last(weight), channels_last(x)
        by_gemm = x.shape[1] <= GEMM_INPUT_GRAD_MAX_IN_CHANNELS
        # oneDNN's backward-data reads only the input's shape and format, but a stand-in (an expanded
        # scalar) would be copied to channels_last (~5 ms at 128×32×16×16): keep a reference to x_cl.
        ctx.save_for_backward(weight_cl, None if by_gemm else x_cl)
        ctx.conv_args = (tuple(x.shape), stride, padding, dilation, by_gemm)
        out = torch.conv2d(x_cl, weight_cl, bias, stride, padding, dilation)
        # PyTorch's conv2d returns its input's layout: a network that flattens an NCHW output with
        # .view(B, -1) must keep working when its weights are frozen (a one-channel input counts as both)
        return out if x.is_contiguous(memory_format=torch.channels_last) else out.contiguous()

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        weight_cl, x_cl = ctx.saved_tensors
        input_shape, stride, padding, dilation, by_gemm = ctx.conv_args
        grad_x = None
        if ctx.needs_input_grad[0]:
            _ROUTES["input grad by GEMM + col2im" if by_gemm else "input grad by oneDNN"] += 1
            grad_x = input_grad(grad_out, weight_cl, x_cl, input_shape, stride, padding, dilation)
        return grad_x, None, None, None, None, None


def _conv2d_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    defaults: dict[str, Any] = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}
    return {**defaults, **dict(zip(names, args, strict=False)), **kwargs}


def _unsupported(arguments: dict[str, Any]) -> str | None:
    """Why this ``conv2d`` call cannot take the frozen-weight path (``None``: it can)."""
    x, weight, bias = arguments["input"], arguments["weight"], arguments["bias"]
    if x.device.type != "cpu":
        return f"input on {x.device.type}, the fast path is measured for the CPU only"
    if x.ndim != 4:
        return f"unbatched or not 2-D input of shape {tuple(x.shape)}"
    if arguments["groups"] != 1:
        return f"groups={arguments['groups']} (only groups=1)"
    if isinstance(arguments["padding"], str):
        return f"padding={arguments['padding']!r} given as a string"
    if not (x.dtype == weight.dtype and x.dtype in (torch.float32, torch.float64)):
        return f"dtype {x.dtype} input with {weight.dtype} weight"
    if bias is not None and bias.requires_grad:
        return "bias requires grad while the weight does not"
    if torch.is_autocast_enabled("cpu"):
        return "CPU autocast (it would hand the backward pass a gradient of another dtype)"
    return None


class FrozenConvolutions(TorchFunctionMode):
    """Within this mode, ``conv2d`` calls whose weights need no gradient run as :class:`FrozenWeightConv2d`.

    Calls whose weight requires gradients (training) run unchanged. Unsupported calls run unchanged and
    are recorded (:func:`fallback_counts`).
    """

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is not torch.conv2d:
            return func(*args, **kwargs)
        arguments = _conv2d_arguments(args, kwargs)
        if arguments["weight"].requires_grad:
            return func(*args, **kwargs)
        reason = _unsupported(arguments)
        if reason is not None:
            _record_fallback(reason)
            return func(*args, **kwargs)
        return FrozenWeightConv2d.apply(
            arguments["input"],
            arguments["weight"],
            arguments["bias"],
            _pair(arguments["stride"]),
            _pair(arguments["padding"]),
            _pair(arguments["dilation"]),
        )


def for_energy(energy: object, x: Tensor) -> contextlib.AbstractContextManager[object]:
    """The context :func:`ebm.energies.energy_and_grad` runs ``energy`` on ``x`` in.

    :class:`FrozenConvolutions` if ``x`` is on the CPU and ``energy`` is a module with an ``nn.Conv2d``
    (and the fast path is not :func:`disabled`), else nothing: energies without convolutions, and CUDA
    (cuDNN's own kernels; there the per-op Python dispatch would cost launch-bound steps), pay no
    dispatch (~0.15 ms per MLP step).

    Whether a module has a convolution is looked up once per module object (the scan costs ~14 µs, 3% of
    a small MLP's step); a convolution added to it later runs on PyTorch's ordinary path.
    """
    if _ENABLED.get() and x.device.type == "cpu" and isinstance(energy, nn.Module) and _has_conv2d(energy):
        return FrozenConvolutions()
    return contextlib.nullcontext()


_HAS_CONV2D: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def _has_conv2d(module: nn.Module) -> bool:
    found = _HAS_CONV2D.get(module)
    if found is None:
        found = _HAS_CONV2D[module] = any(isinstance(m, nn.Conv2d) for m in module.modules())
    return found


def enabled() -> bool:
    """Whether the fast paths (this module's and :mod:`ebm.fastgrad`'s) are on in this context."""
    return _ENABLED.get()


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Run frozen-weight convolutions, and the networks :mod:`ebm.fastgrad` would run by hand, on
    PyTorch's ordinary autograd path, for comparisons."""
    token = _ENABLED.set(False)
    try:
        yield
    finally:
        _ENABLED.reset(token)
