"""Energy functions.

Every energy is a plain :class:`torch.nn.Module` (or any callable) mapping a batch ``x`` of shape
``(B, *event)`` to energies of shape ``(B,)``. Lower energy means more likely:
``p(x) = exp(-E(x)) / Z``. That is the only sign convention used in this library.

The gradient ``∇ₓE`` is computed in exactly one place, :func:`energy_and_grad`, which checks shapes
and never touches the parameters' ``.grad``.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ebm import fastconv, fastgrad

EnergyFn = Callable[[Tensor], Tensor]


def check_energy_output(energy: Tensor, x: Tensor) -> Tensor:
    """Raise unless ``energy`` has shape ``(B,)`` for an input ``x`` of shape ``(B, *event)``."""
    if energy.shape != (x.shape[0],):
        raise ValueError(
            f"an energy must map x of shape (B, *event) = {tuple(x.shape)} to shape (B,) = "
            f"({x.shape[0]},), got {tuple(energy.shape)}"
        )
    return energy


@contextlib.contextmanager
def frozen(energy: EnergyFn) -> Iterator[None]:
    """Temporarily stop ``energy``'s parameters from requiring gradients, in eval mode.

    Sampling needs ``∇ₓE`` only; with frozen parameters autograd neither saves what the weight
    gradients would need nor computes them, and nothing can leak into ``param.grad``. Eval mode makes
    the energy a fixed function while the chains run: spectral norm, for one, would otherwise take a
    power-iteration step (and change its buffers) on every call. On exit every submodule gets back the
    mode it had, each its own (a frozen batch norm in a training model stays in eval).
    """
    if not isinstance(energy, nn.Module):
        yield
        return
    params = [p for p in energy.parameters() if p.requires_grad]
    # Every module's own mode: a submodule kept in eval inside a training model stays in eval.
    modes = [(module, module.training) for module in energy.modules()]
    energy.eval()
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)
        for module, training in modes:
            module.training = training


def energy_and_grad(energy: EnergyFn, x: Tensor, *, compile: bool = False) -> tuple[Tensor, Tensor]:
    """Return ``(E(x), ∇ₓE(x))`` for a batch, with shapes ``(B,)`` and ``x.shape``.

    The gradient is taken with respect to the input only, so the energy's parameters accumulate
    nothing. Both results are detached. In an energy module with 2-D convolutions, those whose weights
    are frozen (inside :func:`frozen`, as in the samplers) run on the CPU through :mod:`ebm.fastconv`: the
    same values, computed in channels_last with the input gradient only. An energy with a
    ``frozen_energy_and_grad(x)`` method (:class:`MLPEnergy`, :class:`ClassConditionalEnergy`) whose
    parameters are all frozen runs on the CPU through it instead: :mod:`ebm.fastgrad`'s hand-written
    pass, no autograd graph at all; the method returns ``None`` for a network it cannot take.

    Args:
        energy: ``(B, *event) → (B,)``.
        x: the batch.
        compile: run the whole forward-and-input-gradient as one ``torch.compile``d graph (traced
            through ``torch.func.grad_and_value``; CUDA graphs on CUDA). The first call per energy and
            input shape compiles (seconds to a minute); if compilation fails, this warns once and falls
            back to the eager path for that energy. Only for energies whose parameters do not require
            gradients (inside :func:`frozen`), as in the samplers.
    """
    if compile:
        return _compiled_energy_and_grad(energy)(x)
    by_hand = getattr(energy, "frozen_energy_and_grad", None)
    if by_hand is not None and fastgrad.usable(cast(nn.Module, energy), x):
        result = by_hand(x)
        if result is not None:
            return check_energy_output(result[0], x), result[1]
    with torch.enable_grad(), fastconv.for_energy(energy, x):
        x = x.detach().requires_grad_(True)
        e = check_energy_output(energy(x), x)
        (grad,) = torch.autograd.grad(e.sum(), x)
    return e.detach(), grad


def _functional_energy_and_grad(energy: EnergyFn, x: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`energy_and_grad`'s arithmetic through ``torch.func``, which ``torch.compile`` traces whole."""

    def total_energy(z: Tensor) -> tuple[Tensor, Tensor]:
        e = check_energy_output(energy(z), z)
        return e.sum(), e

    grad, (_, e) = torch.func.grad_and_value(total_energy, has_aux=True)(x)
    return e.detach(), grad.detach()


# torch.compile of _functional_energy_and_grad, one per compile mode, made on first use. The energy is
# an argument: dynamo guards on its identity (weakly), so every energy gets its own graph, compiled once
# and reused while the parameters change in place, as in training.
_COMPILED: dict[str | None, Callable[[EnergyFn, Tensor], tuple[Tensor, Tensor]]] = {}
_COMPILE_FAILED: weakref.WeakSet[Any] = weakref.WeakSet()


def _compiled_energy_and_grad(energy: EnergyFn) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    def compiled_or_eager(x: Tensor) -> tuple[Tensor, Tensor]:
        if _compile_failed(energy):
            return energy_and_grad(energy, x)
        # On CUDA, "reduce-overhead" replays the step as a CUDA graph: a fixed-shape loop's best case.
        mode = "reduce-overhead" if x.device.type == "cuda" else None
        if mode not in _COMPILED:
            _COMPILED[mode] = torch.compile(_functional_energy_and_grad, fullgraph=True, mode=mode)
        if x.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        try:
            e, grad = _COMPILED[mode](energy, x)
        # torch.compile raises many types (Unsupported, BackendCompilerFailed, InductorError, ...).
        except Exception as error:
            with contextlib.suppress(TypeError):  # not weak-referenceable: it will be tried again
                _COMPILE_FAILED.add(energy)
            warnings.warn(
                f"torch.compile failed for {type(energy).__name__} ({type(error).__name__}: {error}); "
                "using the eager gradient",
                RuntimeWarning,
                stacklevel=3,
            )
            return energy_and_grad(energy, x)
        if x.device.type == "cuda":  # a CUDA-graph replay overwrites its outputs on the next call
            e, grad = e.clone(), grad.clone()
        return e, grad

    return compiled_or_eager


def _compile_failed(energy: EnergyFn) -> bool:
    try:
        return energy in _COMPILE_FAILED
    except TypeError:
        return False


# --- analytic energies: examples, oracles for tests, and baselines -------------------------------


class GaussianEnergy(nn.Module):
    """E(x) = ½ (x − μ)ᵀ Σ⁻¹ (x − μ) + ½ log det(2πΣ): a normalised Gaussian, so log Z = 0."""

    mean: Tensor
    scale_tril: Tensor

    def __init__(self, mean: Tensor, covariance: Tensor) -> None:
        super().__init__()
        mean = torch.as_tensor(mean, dtype=torch.get_default_dtype())
        covariance = torch.as_tensor(covariance, dtype=torch.get_default_dtype())
        if covariance.shape != (mean.numel(), mean.numel()):
            raise ValueError(
                f"covariance must be {mean.numel()}×{mean.numel()} for a mean of {mean.numel()} "
                f"dimensions, got {tuple(covariance.shape)}"
            )
        self.register_buffer("mean", mean)
        self.register_buffer("scale_tril", torch.linalg.cholesky(covariance))

    def forward(self, x: Tensor) -> Tensor:
        dist = torch.distributions.MultivariateNormal(self.mean, scale_tril=self.scale_tril)
        return -dist.log_prob(x)


class GaussianMixtureEnergy(nn.Module):
    """E(x) = −log Σₖ wₖ N(x; μₖ, σₖ² I): a normalised isotropic Gaussian mixture (log Z = 0)."""

    means: Tensor
    stds: Tensor
    log_weights: Tensor

    def __init__(self, means: Tensor, stds: Tensor | float, weights: Tensor | None = None) -> None:
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.get_default_dtype())
        if means.ndim != 2:
            raise ValueError(f"means must have shape (K, D), got {tuple(means.shape)}")
        n_components = means.shape[0]
        stds = torch.as_tensor(stds, dtype=means.dtype).expand(n_components).clone()
        if weights is None:
            weights = torch.full((n_components,), 1.0 / n_components, dtype=means.dtype)
        weights = torch.as_tensor(weights, dtype=means.dtype)
        if weights.shape != (n_components,):
            raise ValueError(
                f"weights must have one per component, shape ({n_components},), got {tuple(weights.shape)}"
            )
        if not (torch.isfinite(means).all() and torch.isfinite(stds).all() and torch.isfinite(weights).all()):
            raise ValueError("means, stds and weights must be finite (one holds a NaN or an infinity)")
        if (stds <= 0).any() or (weights < 0).any() or not weights.sum() > 0:
            raise ValueError(
                "stds must be positive, and weights non-negative with a positive sum, got stds "
                f"{stds.tolist()} and weights {weights.tolist()}"
            )
        self.register_buffer("means", means)
        self.register_buffer("stds", stds)
        self.register_buffer("log_weights", torch.log(weights / weights.sum()))

    def forward(self, x: Tensor) -> Tensor:
        dim = self.means.shape[1]
        if x.ndim != 2 or x.shape[1] != dim:  # (B, 1) would broadcast to the points (x, x)
            raise ValueError(
                f"x must have shape (B, {dim}) for means of shape {tuple(self.means.shape)}, "
                f"got {tuple(x.shape)}"
            )
        # Not torch.cdist: above 25 rows it uses ‖x‖² + ‖μ‖² − 2x·μ, which cancels catastrophically near a
        # mean (∇ₓE off by ~100% within 1e-3 of a mode) and makes E depend on the batch size.
        sq_dist = (x[:, None, :] - self.means).square().sum(-1)  # (B, K)
        log_norm = -dim * (torch.log(self.stds) + 0.5 * math.log(2 * math.pi))  # (K,)
        log_prob = self.log_weights + log_norm - 0.5 * sq_dist / self.stds.square()
        return -torch.logsumexp(log_prob, dim=1)


# --- learned energies -----------------------------------------------------------------------------


@dataclass(frozen=True)
class MLPEnergyConfig:
    """An MLP energy for 2D and tabular data.

    Attributes:
        in_features: dimension of one input row.
        widths: hidden layer widths.
        spectral_norm: wrap every linear layer in spectral normalisation (Miyato et al. 2018), which
            bounds the energy's Lipschitz constant and keeps Langevin chains tame.
        fourier_features: m > 0 feeds the MLP ``[x, sin 2πxB, cos 2πxB]`` besides x, with a fixed
            ``(in_features, m)`` matrix B of N(0, s²) frequencies (Tancik et al. 2020,
            https://arxiv.org/abs/2006.10739): an MLP on raw low-dimensional coordinates is biased
            towards smooth functions and rounds sharp edges and thin structures off; 0 turns it off.
        fourier_scale: s, the frequencies' standard deviation in cycles per unit of x.
        fourier_seed: seeds B, so a config always builds the same features.
        activation: ``"silu"`` (Swish: a smooth energy) or ``"relu"`` (a piecewise-linear energy, whose
            kinks let exp(−E) drop from a plateau to nothing within no width at all; a SiLU network
            rounds every such edge off over ~1/‖w‖ of its first layer's weights).
    """

    in_features: int = 2
    widths: Sequence[int] = (128, 128, 128)
    spectral_norm: bool = False
    fourier_features: int = 0
    fourier_scale: float = 1.0
    fourier_seed: int = 0
    activation: str = "silu"

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if self.fourier_features < 0:
            raise ValueError(f"fourier_features must be ≥ 0, got {self.fourier_features}")
        if not self.fourier_scale > 0 or not math.isfinite(self.fourier_scale):
            raise ValueError(f"fourier_scale must be a positive finite number, got {self.fourier_scale}")


class MLPEnergy(nn.Module):
    """E(x) = MLP(x) with SiLU (Swish) or ReLU activations and a scalar output per row (optionally over
    Fourier features of x as well, see :class:`MLPEnergyConfig`)."""

    frequencies: Tensor

    def __init__(self, config: MLPEnergyConfig) -> None:
        super().__init__()
        self.config = config
        m = config.fourier_features
        generator = torch.Generator().manual_seed(config.fourier_seed)
        frequencies = config.fourier_scale * torch.randn(config.in_features, m, generator=generator)
        self.register_buffer("frequencies", 2 * math.pi * frequencies)
        self.net = mlp(
            config.in_features + 2 * m,
            config.widths,
            1,
            spectral_norm=config.spectral_norm,
            activation=config.activation,
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        if self.config.fourier_features:
            phases = x @ self.frequencies.to(x.dtype)
            x = torch.cat([x, phases.sin(), phases.cos()], dim=1)
        return self.net(x).squeeze(1)

    def frozen_energy_and_grad(self, x: Tensor) -> tuple[Tensor, Tensor] | None:
        """``(E(x), ∇ₓE(x))`` by :mod:`ebm.fastgrad`'s hand-written pass, for frozen weights; ``None``
        with Fourier features, a network it cannot take, or a subclass that computes its energy another
        way (:func:`energy_and_grad` decides when)."""
        layers = fastgrad.cached_sequential_layers(self.net)
        if layers is None or self.config.fourier_features or type(self).forward is not MLPEnergy.forward:
            return None
        fastgrad.count("mlp")
        energy, grad = fastgrad.value_and_input_grad(layers, x.flatten(1), _identity_head)
        return energy, grad.view(x.shape)


def _identity_head(output: Tensor) -> tuple[Tensor, Tensor]:
    """A network's ``(B, 1)`` output as the energies, and its gradient (ones)."""
    return output.squeeze(1), torch.ones_like(output)


def _logsumexp_head(logits: Tensor) -> tuple[Tensor, Tensor]:
    """E = −logsumexp_y logit_y and ∂E/∂logits = −softmax(logits)."""
    log_normaliser = torch.logsumexp(logits, dim=1)
    return -log_normaliser, (logits - log_normaliser[:, None]).exp_().neg_()


ACTIVATIONS: dict[str, type[nn.Module]] = {"silu": nn.SiLU, "relu": nn.ReLU}


def mlp(
    in_features: int,
    widths: Sequence[int],
    out_features: int,
    *,
    spectral_norm: bool,
    activation: str = "silu",
) -> nn.Sequential:
    """Linear layers of the given widths with ``activation`` (a key of :data:`ACTIVATIONS`) between
    them, optionally spectrally normalised."""
    sizes = [in_features, *widths, out_features]
    layers: list[nn.Module] = []
    for width_in, width_out in itertools.pairwise(sizes):
        linear = nn.Linear(width_in, width_out)
        layers += [
            nn.utils.parametrizations.spectral_norm(linear) if spectral_norm else linear,
            ACTIVATIONS[activation](),
        ]
    return nn.Sequential(*layers[:-1])


class ClassConditionalEnergy(nn.Module):
    """E(x, y) = −logit_y(x) over a classifier's logits, with marginal E(x) = −logsumexp_y logit_y(x).

    ``forward(x)`` is the marginal energy, so the module satisfies the ``(B, *event) → (B,)``
    contract; :meth:`joint` gives E(x, y) and :meth:`logits` the classifier view
    (JEM, Grathwohl et al. 2019, https://arxiv.org/abs/1912.03263); ``forward(x, return_logits=True)``
    is :meth:`logits` too, for a trainer that must reach the logits through a wrapper's forward. The
    network sees ``input_scale · x + input_shift`` (:meth:`network_input`); subclasses set both, and may
    check x there.
    """

    input_scale: float = 1.0
    input_shift: float = 0.0

    def __init__(self, logits_net: nn.Module) -> None:
        super().__init__()
        self.logits_net = logits_net

    def network_input(self, x: Tensor) -> Tensor:
        """What the network sees for a batch ``x``."""
        if self.input_scale == 1.0 and self.input_shift == 0.0:
            return x
        return x * self.input_scale + self.input_shift

    def logits(self, x: Tensor) -> Tensor:
        return self.logits_net(self.network_input(x))

    def joint(self, x: Tensor, y: Tensor) -> Tensor:
        """E(x, y) = −logit_y(x), shape ``(B,)``, for integer labels ``y`` of shape ``(B,)``.

        Raises:
            ValueError: ``y`` is not ``(B,)`` for x's batch of B (a wrong length or a 2-D label array
                would be flattened and paired with the wrong rows), or holds floats.
        """
        if y.shape != (x.shape[0],):
            raise ValueError(
                f"joint needs labels of shape ({x.shape[0]},), one per row of x, got labels of shape "
                f"{tuple(y.shape)} for x of shape {tuple(x.shape)}"
            )
        if y.is_floating_point():
            raise ValueError(f"joint needs integer class labels, got {y.dtype}")
        return -self.logits(x).gather(1, y.long().view(-1, 1)).squeeze(1)

    def forward(self, x: Tensor, *, return_logits: bool = False) -> Tensor:
        """E(x), shape ``(B,)``; with ``return_logits`` the logits ``(B, n_classes)`` instead.

        The logits come through ``forward`` so that a training objective can ask
        :class:`~torch.nn.parallel.DistributedDataParallel` for them: DDP averages a backward pass's
        gradients over the ranks only when its own forward built the graph, and a cross-entropy on
        :meth:`logits` of the module inside it would train each rank's classifier alone
        (:class:`~ebm.jem.JEMObjective`).
        """
        logits = self.logits(x)
        return logits if return_logits else -torch.logsumexp(logits, dim=1)

    def frozen_energy_and_grad(self, x: Tensor) -> tuple[Tensor, Tensor] | None:
        """``(E(x), ∇ₓE(x))`` by :mod:`ebm.fastgrad`'s hand-written pass, for frozen weights; ``None`` for
        a network it cannot take, or a subclass that computes its logits or energy another way."""
        overridden = (
            type(self).logits is not ClassConditionalEnergy.logits
            or type(self).forward is not ClassConditionalEnergy.forward
        )
        layers = fastgrad.cached_sequential_layers(self.logits_net)
        if layers is None or overridden:
            return None
        fastgrad.count("class-conditional")
        energy, grad = fastgrad.value_and_input_grad(layers, self.network_input(x), _logsumexp_head)
        if self.input_scale != 1.0:
            grad.mul_(self.input_scale)
        return energy, grad.view(x.shape)


@dataclass(frozen=True)
class MLPClassifierConfig:
    in_features: int = 2
    n_classes: int = 2
    widths: Sequence[int] = (64, 64)
    spectral_norm: bool = False


def mlp_logits(config: MLPClassifierConfig) -> nn.Module:
    """An MLP producing ``n_classes`` logits: the body of a :class:`ClassConditionalEnergy`."""
    body = mlp(config.in_features, config.widths, config.n_classes, spectral_norm=config.spectral_norm)
    return nn.Sequential(nn.Flatten(1), body)


def seed_linear_layers_(module: nn.Module, *, generator: torch.Generator) -> nn.Module:
    """Redraw every linear layer's initial weights from ``generator`` (in place), not the global RNG.

    Each layer gets PyTorch's default range U(−1/√fan_in, 1/√fan_in); with spectral normalisation
    the underlying weight and the power-iteration vectors are redrawn too. Returns ``module``.
    """
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, nn.Linear):
                _seed_linear(layer, generator)
    return module


def _seed_linear(linear: nn.Linear, generator: torch.Generator) -> None:
    bound = 1.0 / math.sqrt(linear.in_features)
    if not parametrize.is_parametrized(linear, "weight"):
        linear.weight.uniform_(-bound, bound, generator=generator)
        linear.bias.uniform_(-bound, bound, generator=generator)
        return
    parametrizations = cast(nn.ModuleDict, linear.parametrizations)
    weight = cast(parametrize.ParametrizationList, parametrizations["weight"])
    weight.original.uniform_(-bound, bound, generator=generator)
    linear.bias.uniform_(-bound, bound, generator=generator)
    # spectral_norm drew its singular-vector estimates u, v from the global RNG: redraw v and run the
    # 15 power iterations u ← W v / ‖W v‖, v ← Wᵀu / ‖Wᵀu‖ that it runs at construction.
    spectral_norm = weight[0]
    matrix = weight.original  # (out_features, in_features)
    v = F.normalize(torch.randn(matrix.shape[1], generator=generator, device=generator.device), dim=0)
    for _ in range(15):
        u = F.normalize(matrix @ v, dim=0)
        v = F.normalize(matrix.T @ u, dim=0)
    cast(Tensor, spectral_norm._u).copy_(u)
    cast(Tensor, spectral_norm._v).copy_(v)
