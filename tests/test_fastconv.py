"""The frozen-weight convolution path (``ebm.fastconv``) changes speed, not results.

Every case compares against plain autograd on the same module (``fastconv.disabled()`` or no mode at all):
energies and input gradients per convolution shape, whole chains for a fixed noise sequence, parameter
gradients in training (which must bypass the path), the image trainer's sampler, and the recorded reason
whenever a convolution falls back to PyTorch's ordinary path.
"""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ebm import fastconv
from ebm.energies import MLPEnergy, MLPEnergyConfig, energy_and_grad, frozen
from ebm.image_energies import CNN28, CNN28Config, ImageEnergy, ResNet32, ResNet32Config
from ebm.samplers import MALA, Langevin


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class ConvEnergy(nn.Module):
    """One convolution, SiLU, and a fixed random readout: E(x) = ⟨r, silu(conv(x))⟩."""

    readout: Tensor

    def __init__(self, conv: nn.Conv2d, in_size: int) -> None:
        super().__init__()
        self.conv = conv
        with torch.no_grad():
            out_shape = conv(torch.zeros(1, conv.in_channels, in_size, in_size)).shape[1:]
        self.register_buffer("readout", torch.randn(out_shape, generator=seeded(1)))

    def forward(self, x: Tensor) -> Tensor:
        return (F.silu(self.conv(x)) * self.readout).flatten(1).sum(1)


def autograd_energy_and_grad(energy: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """The reference: autograd through the module as it is, weights requiring gradients or not."""
    xr = x.detach().requires_grad_(True)
    e = energy(xr)
    (grad,) = torch.autograd.grad(e.sum(), xr)
    return e.detach(), grad


CONVS: dict[str, tuple[dict[str, Any], int]] = {
    "1ch_k5_s2_p4": (dict(in_channels=1, out_channels=8, kernel_size=5, stride=2, padding=4), 28),
    "3ch_k3_s1_p1": (dict(in_channels=3, out_channels=8, kernel_size=3, padding=1), 12),
    "2ch_k3x2_s2x1_p1x0_d2": (
        dict(in_channels=2, out_channels=5, kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), dilation=2),
        13,
    ),
    "1ch_k4_s3_uncovered_rows": (dict(in_channels=1, out_channels=4, kernel_size=4, stride=3), 11),
    "16ch_k3_s2_p1_onednn": (dict(in_channels=16, out_channels=8, kernel_size=3, stride=2, padding=1), 9),
    "8ch_k1_no_bias": (dict(in_channels=8, out_channels=6, kernel_size=1, bias=False), 7),
}


@pytest.mark.parametrize("name", list(CONVS))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_frozen_convolution_gives_autograds_energy_and_input_gradient(name: str, layout: str) -> None:
    kwargs, size = CONVS[name]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        energy = ConvEnergy(nn.Conv2d(**kwargs), size)
    x = torch.randn(5, energy.conv.in_channels, size, size, generator=seeded(2))
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    with frozen(energy):
        expected_e, expected_grad = autograd_energy_and_grad(energy, x)
        before = fastconv.route_counts()
        e, grad = energy_and_grad(energy, x)
        after = fastconv.route_counts()
    route = (
        "input grad by GEMM + col2im"
        if energy.conv.in_channels <= fastconv.GEMM_INPUT_GRAD_MAX_IN_CHANNELS
        else "input grad by oneDNN"
    )
    assert after.get(route, 0) == before.get(route, 0) + 1  # the fast path ran, by the expected route
    assert grad.shape == x.shape and expected_grad.abs().max() > 0
    torch.testing.assert_close(e, expected_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5 * float(expected_grad.abs().max()))


def cnn28() -> ImageEnergy:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return ImageEnergy(CNN28(CNN28Config(channels=(8, 16, 16, 16), hidden=16)), (1, 28, 28))


def resnet32() -> ImageEnergy:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return ImageEnergy(ResNet32(ResNet32Config(width=8)), (3, 32, 32))


def spectral_cnn28() -> ImageEnergy:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        config = CNN28Config(channels=(8, 8, 8, 8), hidden=16, spectral_norm=True)
        return ImageEnergy(CNN28(config), (1, 28, 28))


MODELS = {"cnn28": cnn28, "resnet32": resnet32, "cnn28_spectral_norm": spectral_cnn28}


@pytest.mark.parametrize("name", list(MODELS))
def test_image_energies_give_autograds_gradient_and_chain_for_the_same_noise(name: str) -> None:
    energy = MODELS[name]()
    x0 = torch.rand(6, *energy.image_shape, generator=seeded(3))
    with frozen(energy):
        expected_e, expected_grad = autograd_energy_and_grad(energy, x0)
        forward_calls = fastconv.route_counts().get("forward", 0)
        with fastconv.FrozenConvolutions():
            e, grad = autograd_energy_and_grad(energy, x0)
        n_convs = sum(isinstance(m, nn.Conv2d) for m in energy.modules())
        assert fastconv.route_counts()["forward"] == forward_calls + n_convs  # every convolution took it
        # the library's own choice (for CNN28, ebm.fastgrad's hand-written pass) gives the same
        e_library, grad_library = energy_and_grad(energy, x0)
    scale = float(expected_grad.abs().max())  # the gradients of these small networks are ~1e-5
    for energies, gradient in ((e, grad), (e_library, grad_library)):
        torch.testing.assert_close(energies, expected_e, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gradient, expected_grad, rtol=1e-4, atol=1e-5 * scale)

    n_steps = 8
    noise = torch.randn((n_steps, *x0.shape), generator=seeded(4))
    sampler = Langevin(step_size=20.0, noise_scale=0.01, clamp=(0.0, 1.0))
    chains, _ = sampler.run(energy, x0, n_steps, noise=noise)
    with fastconv.disabled():
        reference, _ = sampler.run(energy, x0, n_steps, noise=noise)
    assert (reference - x0).abs().max() > 0.05  # the gradient moved the chains, not only the noise
    torch.testing.assert_close(chains, reference, rtol=1e-4, atol=1e-5)


def test_mala_takes_the_same_path_and_accepts_the_same_proposals() -> None:
    energy, x0 = cnn28(), torch.rand(4, 1, 28, 28, generator=seeded(5))
    sampler = MALA(step_size=1e-3)
    x, stats = sampler.run(energy, x0, 4, generator=seeded(6))
    with fastconv.disabled():
        reference, reference_stats = sampler.run(energy, x0, 4, generator=seeded(6))
    torch.testing.assert_close(x, reference, rtol=1e-4, atol=1e-5)
    assert stats.acceptance_rate == reference_stats.acceptance_rate


def test_training_gradients_bypass_the_path_and_equal_autograds() -> None:
    energy, x = cnn28(), torch.rand(4, 1, 28, 28, generator=seeded(7))
    counts = fastconv.route_counts()
    with fastconv.FrozenConvolutions():
        energy(x).mean().backward()
    assert fastconv.route_counts() == counts  # weights that need gradients: nothing intercepted
    grads = {name: p.grad.clone() for name, p in energy.named_parameters() if p.grad is not None}
    energy.zero_grad()
    energy(x).mean().backward()
    assert len(grads) == len(list(energy.parameters()))
    for name, p in energy.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-6, atol=1e-8)


def test_a_convolution_the_path_cannot_take_runs_unchanged_and_its_reason_is_recorded() -> None:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        energy = ConvEnergy(nn.Conv2d(4, 6, 3, groups=2), 9)
    x = torch.randn(3, 4, 9, 9, generator=seeded(8))
    before = fastconv.fallback_counts().get("groups=2 (only groups=1)", 0)
    with frozen(energy):
        expected = autograd_energy_and_grad(energy, x)
        result = energy_and_grad(energy, x)
    assert fastconv.fallback_counts()["groups=2 (only groups=1)"] == before + 1
    torch.testing.assert_close(result, expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gemm_input_gradient_equals_autograds_in_both_layouts_and_repeats_exactly(dtype: torch.dtype) -> None:
    # col2im as a scatter-add into the padded input: every tap lands where autograd puts it (stride,
    # padding and dilation differ per axis), NCHW and channels_last ∂y alike, and the sum is the same
    # bits on every call (each image's row is added up by one thread, in one order)
    weight = torch.randn(7, 2, 3, 4, generator=seeded(11), dtype=dtype)
    x = torch.randn(6, 2, 15, 14, generator=seeded(12), dtype=dtype, requires_grad=True)
    stride, padding, dilation = (2, 1), (1, 3), (2, 1)
    y = F.conv2d(x, weight, None, stride, padding, dilation)
    grad_out = torch.randn(y.shape, generator=seeded(13), dtype=dtype)
    (expected,) = torch.autograd.grad(y, x, grad_out)
    for layout in (grad_out, grad_out.contiguous(memory_format=torch.channels_last)):
        grad = fastconv.input_grad_by_gemm(layout, weight, (15, 14), stride, padding, dilation)
        assert grad.shape == x.shape and grad.is_contiguous() and grad.dtype == dtype
        torch.testing.assert_close(grad, expected)
        again = fastconv.input_grad_by_gemm(layout, weight, (15, 14), stride, padding, dilation)
        assert torch.equal(again, grad)


def test_channels_last_restrides_one_channel_tensors_that_contiguous_leaves_alone() -> None:
    x = torch.randn(2, 1, 5, 5)
    assert x.contiguous(memory_format=torch.channels_last).stride() == x.stride()  # PyTorch's no-op
    restrided = fastconv.channels_last(x)
    assert restrided.stride() == (25, 1, 5, 1) and torch.equal(restrided, x)
    already = torch.randn(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    assert fastconv.channels_last(already) is already


def test_functional_conv2d_with_one_element_lists_inside_the_mode() -> None:
    weight = torch.randn(6, 2, 3, 3, generator=seeded(9))  # a plain tensor: no gradient needed
    x = torch.randn(3, 2, 10, 10, generator=seeded(10), requires_grad=True)
    forward_calls = fastconv.route_counts().get("forward", 0)
    with fastconv.FrozenConvolutions():
        fast = F.conv2d(x, weight, None, [2], [1])
        (fast_grad,) = torch.autograd.grad(fast.square().sum(), x)
    assert fastconv.route_counts()["forward"] == forward_calls + 1
    plain = F.conv2d(x, weight, None, [2], [1])
    (plain_grad,) = torch.autograd.grad(plain.square().sum(), x)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast_grad, plain_grad, rtol=1e-4, atol=1e-5)


def test_energies_without_convolutions_and_non_cpu_inputs_run_outside_the_mode() -> None:
    images, rows = torch.rand(2, 1, 28, 28), torch.rand(2, 2)
    assert isinstance(fastconv.for_energy(MLPEnergy(MLPEnergyConfig()), rows), contextlib.nullcontext)
    assert isinstance(fastconv.for_energy(cnn28(), images), fastconv.FrozenConvolutions)
    assert isinstance(fastconv.for_energy(cnn28(), images.to("meta")), contextlib.nullcontext)  # not CPU
    with fastconv.disabled():
        assert isinstance(fastconv.for_energy(cnn28(), images), contextlib.nullcontext)


@pytest.mark.parametrize("name", list(MODELS))
def test_the_fast_input_gradient_of_an_empty_batch_is_empty(name: str) -> None:
    energy = MODELS[name]()
    x = torch.zeros(0, *energy.image_shape)
    with frozen(energy):
        energies, gradient = energy_and_grad(energy, x)  # was: "cannot reshape tensor of 0 elements"
        with fastconv.FrozenConvolutions():
            energies_frozen, gradient_frozen = autograd_energy_and_grad(energy, x)
    assert energies.shape == energies_frozen.shape == (0,)
    assert gradient.shape == gradient_frozen.shape == x.shape


class FlattensWithView(nn.Module):
    """A user network that flattens an NCHW feature map with ``.view``, as many do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4 * 8 * 8, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = F.silu(self.conv(x))
        return self.head(h.view(len(h), -1)).squeeze(1)


def test_a_frozen_convolution_returns_its_inputs_layout_so_view_keeps_working() -> None:
    # before: the output came back channels_last, and .view raised "view size is not compatible"
    torch.manual_seed(0)
    energy, x = FlattensWithView(), torch.rand(5, 3, 8, 8)
    with frozen(energy):
        fast = energy_and_grad(energy, x)
        with fastconv.disabled():
            reference = energy_and_grad(energy, x)
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-6)
    assert fast[1].is_contiguous()
