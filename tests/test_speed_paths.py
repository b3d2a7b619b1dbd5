"""The sampler's fast paths change speed, not results.

Against the textbook's loop (``benchmarks/textbook.py``) and a plain reference of the update rule, the
library's Langevin must give the same chains for the same noise; ``torch.compile``, ``channels_last``
and the CUDA-only switches (which fall back on CPU) must not change them either; and no path may leave
gradients in the energy's parameters.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import Tensor, nn

from ebm import energies
from ebm.energies import MLPEnergy, MLPEnergyConfig, energy_and_grad
from ebm.image_energies import CNN28, CNN28Config, ImageEnergy, ResNet32, ResNet32Config
from ebm.samplers import Langevin


def _load_textbook() -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "textbook.py"
    spec = importlib.util.spec_from_file_location("benchmarks_textbook", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


textbook = _load_textbook()


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def with_seed(build: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return build()


def mlp() -> nn.Module:
    return with_seed(lambda: MLPEnergy(MLPEnergyConfig(in_features=2, widths=(16, 16))))


def cnn28() -> ImageEnergy:
    net = with_seed(lambda: CNN28(CNN28Config(channels=(8, 8, 8, 8), hidden=16)))
    return ImageEnergy(net, (1, 28, 28))


def resnet32() -> ImageEnergy:
    return ImageEnergy(with_seed(lambda: ResNet32(ResNet32Config(width=8))), (3, 32, 32))


def reference_langevin(
    energy: nn.Module, x0: Tensor, n_steps: int, sampler: Langevin, generator: torch.Generator
) -> Tensor:
    """The update rule written plainly, out of place: x ← clamp(x − η·clip(∇E) + σ·ξ)."""
    x = x0.clone()
    for _ in range(n_steps):
        xr = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(energy(xr).sum(), xr)
        if sampler.grad_clip is not None:
            norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
            grad = grad * (sampler.grad_clip / norm).clamp(max=1.0).view(-1, *([1] * (grad.ndim - 1)))
        x = x - sampler.step_size * grad + sampler.sigma * torch.randn(x.shape, generator=generator)
        if sampler.clamp is not None:
            x = x.clamp(*sampler.clamp)
    return x.detach()


@pytest.mark.parametrize(
    "sampler",
    [
        pytest.param(Langevin(step_size=0.01), id="default"),
        pytest.param(
            Langevin(step_size=0.05, noise_scale=0.01, grad_clip=0.5, clamp=(-2.0, 2.0)),
            id="decoupled_clipped_clamped",
        ),
    ],
)
def test_in_place_langevin_matches_the_plain_update_rule(sampler: Langevin) -> None:
    energy, x0 = mlp(), torch.randn(64, 2, generator=seeded(0))
    x, _ = sampler.run(energy, x0, 15, generator=seeded(1))
    reference = reference_langevin(energy, x0, 15, sampler, seeded(1))
    torch.testing.assert_close(x, reference, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("build", "x0"),
    [
        pytest.param(mlp, torch.randn(32, 2, generator=seeded(2)), id="mlp"),
        pytest.param(cnn28, torch.rand(8, 1, 28, 28, generator=seeded(2)), id="cnn28"),
    ],
)
def test_textbook_loop_and_library_give_the_same_chain_for_the_same_noise(
    build: Callable[[], nn.Module], x0: Tensor
) -> None:
    energy, n_steps, step_size = build(), 8, 0.01
    noise = torch.randn((n_steps, *x0.shape), generator=seeded(3))
    x_textbook = textbook.textbook_langevin(energy, x0, n_steps, step_size, noise=noise)
    energy.zero_grad(set_to_none=True)
    sampler = textbook.library_equivalent(step_size, x0.shape[0])
    x_library, _ = sampler.run(energy, x0, n_steps, noise=noise)
    assert (x_textbook - x0).abs().max() > 0.1  # the chains moved
    torch.testing.assert_close(x_library, x_textbook, rtol=1e-5, atol=1e-6)


def test_textbook_loop_fills_parameter_gradients_and_the_library_does_not() -> None:
    energy, x0 = mlp(), torch.randn(16, 2, generator=seeded(4))
    textbook.textbook_langevin(energy, x0, 2, 0.01)
    assert all(p.grad is not None for p in energy.parameters())
    energy.zero_grad(set_to_none=True)
    Langevin(step_size=0.01).run(energy, x0, 2, generator=seeded(4))
    assert all(p.grad is None and p.requires_grad for p in energy.parameters())


def test_pre_drawn_noise_is_the_generator_path() -> None:
    energy, x0 = mlp(), torch.randn(16, 2, generator=seeded(5))
    generator = seeded(6)
    noise = torch.stack([torch.randn(x0.shape, generator=generator) for _ in range(5)])
    x_drawn, _ = Langevin(step_size=0.02).run(energy, x0, 5, generator=seeded(6))
    x_given, _ = Langevin(step_size=0.02).run(energy, x0, 5, noise=noise)
    assert torch.equal(x_drawn, x_given)
    with pytest.raises(ValueError, match="noise must have shape"):
        Langevin().run(energy, x0, 4, noise=noise)


@pytest.mark.parametrize("build", [cnn28, resnet32], ids=["cnn28", "resnet32"])
def test_channels_last_gives_the_same_energies_gradients_and_chains(build: Callable[[], ImageEnergy]) -> None:
    energy = build()
    shape = (6, *energy.image_shape)
    x = torch.rand(shape, generator=seeded(7))
    energy_cl = build().to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    e, grad = energy_and_grad(energy, x)
    e_cl, grad_cl = energy_and_grad(energy_cl, x_cl)
    torch.testing.assert_close(e_cl, e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_cl, grad, rtol=1e-4, atol=1e-7)
    sampler = Langevin(step_size=1.0, noise_scale=0.01)
    chains, _ = sampler.run(energy, x, 5, generator=seeded(8))
    chains_cl, _ = sampler.run(energy_cl, x_cl, 5, generator=seeded(8))
    assert chains_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(chains_cl, chains, rtol=1e-5, atol=1e-6)


def test_cuda_only_switches_fall_back_on_cpu_without_changing_the_chain() -> None:
    energy, x0 = mlp(), torch.randn(16, 2, generator=seeded(9))
    x, _ = Langevin(step_size=0.02).run(energy, x0, 5, generator=seeded(10))
    x_bf16, _ = Langevin(step_size=0.02, autocast_bf16=True).run(energy, x0, 5, generator=seeded(10))
    assert torch.equal(x, x_bf16)


def test_compile_failure_falls_back_to_eager_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_compile(*args: object, **kwargs: object) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
        def compiled(x: Tensor) -> tuple[Tensor, Tensor]:
            raise RuntimeError("no compiler here")

        return compiled

    monkeypatch.setattr(torch, "compile", failing_compile)
    monkeypatch.setattr(energies, "_COMPILED", {})  # forget compiled functions made by other tests
    energy, x0 = mlp(), torch.randn(16, 2, generator=seeded(11))
    eager, _ = Langevin(step_size=0.02).run(energy, x0, 3, generator=seeded(12))
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        fallback, _ = Langevin(step_size=0.02, compile=True).run(energy, x0, 3, generator=seeded(12))
    assert torch.equal(fallback, eager)
    assert all(p.grad is None and p.requires_grad for p in energy.parameters())


@pytest.mark.slow  # a cold torch.compile takes 5–20 s on two cores
def test_compiled_and_eager_langevin_give_the_same_chain() -> None:
    energy, x0 = mlp(), torch.randn(32, 2, generator=seeded(13))
    eager, eager_stats = Langevin(step_size=0.02).run(energy, x0, 5, generator=seeded(14))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled, compiled_stats = Langevin(step_size=0.02, compile=True).run(
            energy, x0, 5, generator=seeded(14)
        )
    if any("torch.compile failed" in str(w.message) for w in caught):
        pytest.skip("torch.compile is unavailable here (no C++ compiler?); the fallback is tested above")
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled_stats.grad_norm, eager_stats.grad_norm, rtol=1e-5, atol=1e-7)
    assert all(p.grad is None and p.requires_grad for p in energy.parameters())
    assert not any(math.isnan(float(v)) for v in (compiled_stats.final_energy, compiled_stats.grad_norm))


def test_final_energy_statistic_is_an_ordinary_tensor() -> None:
    energy, x0 = mlp(), torch.randn(8, 2, generator=seeded(15))
    _, stats = Langevin().run(energy, x0, 2, generator=seeded(16))
    assert not stats.final_energy.is_inference()
    assert torch.isfinite(stats.final_energy * torch.ones((), requires_grad=True))
