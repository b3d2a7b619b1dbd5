"""Evaluation of image energies: accuracy, OOD AUROC, Fréchet distance, and an AIS estimate of log Z.

Every score here follows the library's one sign convention for energies and, for OOD detection, says
"higher = more like the training data"; AUROC is scikit-learn's ``roc_auc_score`` with the training
distribution's test images as the positive class. :func:`ood_scores` keeps the scores themselves, so the
ROC curves behind those AUROCs (:meth:`OODScores.roc_curves`) cost no second pass over the images.

OOD scores (:data:`OOD_SCORES`), each a different answer to the known failure of likelihood-style models
(Nalisnick et al. 2019, https://arxiv.org/abs/1810.09136), which give *simpler* images (mostly black
digits) lower energy than their own data:

- ``energy``: −E(x) = logsumexp_y f_y(x), the unnormalised log-density (JEM's log p(x)).
- ``max_softmax``: max_y p(y | x), the class-conditional confidence (Hendrycks & Gimpel 2017).
- ``grad_norm``: −‖∇ₓE(x)‖, JEM's "approximate mass" score: data sit in wide basins of E, so a small
  gradient norm means in-distribution (Grathwohl et al. 2019, §5.2).
- ``complexity``: −E(x) + ln 2 · L(x), the input-complexity correction of Serrà et al. 2020
  (https://arxiv.org/abs/1909.11480), with L(x) the PNG-compressed size of the 8-bit image in bits:
  a likelihood ratio against a generic compressor. It is only meaningful when E is in nats of a
  normalised-up-to-a-constant density; an EBM trained with decoupled Langevin noise has energies on
  another scale, which the evaluation reports rather than hides.
- ``typicality``: how typical the model's own statistics of x are of in-distribution images, "density
  of states" (Morningstar et al. 2021, https://arxiv.org/abs/2006.09273): a 1D Gaussian KDE of each
  of −E(x), log ‖∇ₓE(x)‖ and max_y p(y | x), fitted on held-out in-distribution images (the validation
  split; never on OOD data), and the sum of their log densities. A value can be atypical on either
  side, so an image with *too low* an energy (the trap above) scores as out of distribution too.
- ``class_typicality``: the same three KDEs fitted per class, on the reference images the model assigns
  to that class, and evaluated for x under the class it is assigned to: how typical x's statistics are
  *of the class JEM calls it*: a digit the model calls a trouser must have the energy, the gradient and
  the confidence of a trouser to pass (JEM's class-conditional structure, Grathwohl et al. 2019, put to
  the density-of-states test).

AIS (Neal 2001) anneals from the uniform density on the box [0, 1]^D (log Z₀ = 0) to
p(x) ∝ exp(−E(x)) on the box through p_β ∝ exp(−β E(x)), with MALA transitions run in logit space
(:class:`TemperedLogitEnergy`); the weights give
log Ẑ = log mean w and a delta-method standard error. E[log Ẑ] ≤ log Z (Jensen), so the test NLL it
implies is optimistic in expectation: report it with that caveat.
"""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import Tensor, nn

from ebm.energies import ClassConditionalEnergy, energy_and_grad, frozen
from ebm.evaluation.curves import MAX_CURVE_POINTS, roc_points
from ebm.evaluation.density2d import raise_if_rows_not_finite
from ebm.samplers import MALA

OOD_SCORES = ("energy", "max_softmax", "grad_norm", "complexity", "typicality", "class_typicality")
_FITTED_SCORES = ("typicality", "class_typicality")  # need in-distribution reference images
N_STATISTICS = 3  # the columns of model_statistics() that describe x; the last one is its predicted class


def _batched(fn: Callable[[Tensor], Tensor], x: Tensor, batch_size: int) -> Tensor:
    return torch.cat([fn(chunk) for chunk in x.split(batch_size)])


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def accuracy(
    model: ClassConditionalEnergy, images: Tensor, labels: Tensor, *, batch_size: int = 1000
) -> float:
    """Classification accuracy of ``argmax_y f_y(x)`` on [0, 1] ``images`` ``(N, C, H, W)``, in eval mode.

    Raises:
        ValueError: no images, or ``labels`` is not ``(N,)`` (an ``(N, 1)`` column would broadcast to
            N × N).
    """
    if len(images) == 0:
        raise ValueError("accuracy needs at least one image, got none")
    if labels.shape != (len(images),):
        raise ValueError(f"labels must have shape ({len(images)},), one per image, got {tuple(labels.shape)}")
    device = _device_of(model)
    with frozen(model):  # dropout or spectral norm in training mode would make this a random number
        logits = _batched(lambda x: model.logits(x.to(device)).float().cpu(), images, batch_size)
    return float((logits.argmax(dim=1) == labels.cpu()).float().mean())


# --- OOD detection --------------------------------------------------------------------------------


def png_bits(images: Tensor) -> Tensor:
    """L(x): the PNG-compressed size in bits of each [0, 1] image quantised to 8 bits, shape ``(N,)``."""
    from PIL import Image

    pixels = (images.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8)  # (N, C, H, W)
    sizes = []
    for image in pixels.permute(0, 2, 3, 1).numpy():  # (H, W, C)
        buffer = io.BytesIO()
        Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(
            buffer, "PNG", optimize=True
        )
        sizes.append(8 * buffer.tell())
    return torch.tensor(sizes, dtype=torch.float32)


class Typicality:
    """The ``typicality`` score: per-statistic Gaussian KDEs (Scott's bandwidth) of reference statistics.

    Args:
        reference: ``(N, S)`` statistics of held-out in-distribution images, one column per statistic.
    """

    def __init__(self, reference: Tensor) -> None:
        if reference.ndim != 2 or reference.shape[0] < 2:
            raise ValueError(f"reference statistics must be (N ≥ 2, S), got {tuple(reference.shape)}")
        raise_if_rows_not_finite(reference, "reference statistics")
        self.reference = reference.double()
        n = self.reference.shape[0]
        spread = self.reference.std(dim=0).clamp_min(1e-12)
        self.bandwidths = 1.06 * spread * n ** (-1 / 5)

    def log_density(self, statistics: Tensor) -> Tensor:
        """Σ_s log KDE_s(statistics[:, s]), shape ``(M,)``: higher = more typical.

        Raises:
            ValueError: ``statistics`` is not ``(M, S)`` with the reference's ``S`` columns, or holds a NaN
                or infinite value (a diverged model's energy): a NaN typicality would only fail later.
        """
        columns = self.reference.shape[1]
        if statistics.ndim != 2 or statistics.shape[1] != columns:
            raise ValueError(
                f"statistics must be (M, {columns}) like the reference, got {tuple(statistics.shape)}"
            )
        raise_if_rows_not_finite(statistics, "statistics")
        total = torch.zeros(statistics.shape[0], dtype=torch.float64)
        n = self.reference.shape[0]
        for s, bandwidth in enumerate(self.bandwidths):
            for rows in torch.arange(statistics.shape[0]).split(1000):  # (1000, N) at a time
                z = (statistics[rows, s].double()[:, None] - self.reference[None, :, s]) / bandwidth
                total[rows] += torch.logsumexp(-0.5 * z.square(), dim=1)
            total -= math.log(n) + math.log(float(bandwidth) * math.sqrt(2 * math.pi))
        return total


class ReferenceStatistics:
    """The in-distribution side of the ``typicality`` and ``class_typicality`` scores.

    Args:
        statistics: :func:`model_statistics` of held-out in-distribution images (never of OOD data):
            :data:`N_STATISTICS` columns, then the predicted class.
        n_classes: the classifier's number of classes.

    ``typicality`` uses one :class:`Typicality` of all reference images; ``class_typicality`` one per
    class, fitted on the reference images the model assigns to it. A class assigned fewer than two
    reference images has no spread to fit: its images are scored against all reference images, with a
    warning that names the class (only an untrained or degenerate model gets there).
    """

    def __init__(self, statistics: Tensor, n_classes: int) -> None:
        values, predicted = _split_statistics(statistics)
        if predicted.numel() and not 0 <= int(predicted.min()) <= int(predicted.max()) < n_classes:
            raise ValueError(
                f"predicted classes must lie in [0, {n_classes}), got {predicted.unique().tolist()}"
            )
        self.pooled = Typicality(values)
        counts = torch.bincount(predicted, minlength=n_classes)
        self.per_class = {c: Typicality(values[predicted == c]) for c in range(n_classes) if counts[c] >= 2}
        self.pooled_classes = [c for c in range(n_classes) if counts[c] < 2]
        if self.pooled_classes:
            warnings.warn(
                f"class_typicality: the model assigns classes {self.pooled_classes} to fewer than 2 "
                "reference images; images it assigns to them are scored against all reference images",
                stacklevel=2,
            )

    def typicality(self, statistics: Tensor) -> Tensor:
        """The pooled score, Σ_s log KDE_s(statistics[:, s]), shape ``(M,)``: higher = more typical."""
        return self.pooled.log_density(_split_statistics(statistics)[0])

    def class_typicality(self, statistics: Tensor) -> Tensor:
        """Σ_s log KDE_{s, ŷ}(statistics[:, s]) under each row's predicted class ŷ, shape ``(M,)``."""
        values, predicted = _split_statistics(statistics)
        total = torch.empty(values.shape[0], dtype=torch.float64)
        for c in predicted.unique().tolist():
            rows = predicted == c
            total[rows] = self.per_class.get(c, self.pooled).log_density(values[rows])
        return total


def _split_statistics(statistics: Tensor) -> tuple[Tensor, Tensor]:
    if statistics.ndim != 2 or statistics.shape[1] != N_STATISTICS + 1:
        raise ValueError(
            f"model statistics must be (N, {N_STATISTICS + 1}), the predicted class last; "
            f"got {tuple(statistics.shape)}"
        )
    return statistics[:, :N_STATISTICS], statistics[:, N_STATISTICS].round().long()


def model_statistics(model: ClassConditionalEnergy, images: Tensor, *, batch_size: int = 500) -> Tensor:
    """``(N, 4)``: −E(x), log ‖∇ₓE(x)‖, max_y p(y | x) and argmax_y p(y | x) of [0, 1] ``images``.

    The first :data:`N_STATISTICS` columns describe x; the last is its predicted class (as a float).
    All four come from the model in eval mode, whatever mode the caller left it in.
    """
    device = _device_of(model)

    def one_batch(x: Tensor) -> Tensor:
        x = x.to(device)
        with frozen(model):
            _, grad = energy_and_grad(model, x)
            with torch.no_grad():
                logits = model.logits(x).float()
        log_grad = grad.flatten(1).float().norm(dim=1).clamp_min(1e-30).log()
        confidence, predicted = logits.softmax(dim=1).max(dim=1)
        return torch.stack(
            [torch.logsumexp(logits, dim=1), log_grad, confidence, predicted.float()], dim=1
        ).cpu()

    return _batched(one_batch, images, batch_size)


def fit_reference(
    model: ClassConditionalEnergy, images: Tensor, *, batch_size: int = 500
) -> ReferenceStatistics:
    """:class:`ReferenceStatistics` of held-out in-distribution [0, 1] ``images`` under ``model``."""
    with torch.no_grad():
        n_classes = model.logits(images[:1].to(_device_of(model))).shape[1]
    return ReferenceStatistics(model_statistics(model, images, batch_size=batch_size), n_classes)


def scores_from_statistics(
    statistics: Tensor, images: Tensor, score: str, *, reference: ReferenceStatistics | None = None
) -> Tensor:
    """One OOD score (higher = more like the training data) from :func:`model_statistics` of ``images``.

    Raises:
        ValueError: ``score`` is not one of :data:`OOD_SCORES`, or ``reference`` is missing for it.
    """
    _check_score(score, reference)
    if score == "energy":
        return statistics[:, 0]  # −E(x)
    if score == "grad_norm":
        return -statistics[:, 1].exp()
    if score == "max_softmax":
        return statistics[:, 2]
    if score == "complexity":
        return statistics[:, 0] + math.log(2) * png_bits(images)
    assert reference is not None  # _check_score
    if score == "typicality":
        return reference.typicality(statistics).float()
    return reference.class_typicality(statistics).float()


def _check_score(score: str, reference: ReferenceStatistics | None) -> None:
    if score not in OOD_SCORES:
        raise ValueError(f"unknown OOD score {score!r}; choose one of {list(OOD_SCORES)}")
    if score in _FITTED_SCORES and reference is None:
        raise ValueError(f"the {score} score needs ReferenceStatistics fitted on in-distribution images")


def ood_score(
    model: ClassConditionalEnergy,
    images: Tensor,
    score: str,
    *,
    batch_size: int = 500,
    reference: ReferenceStatistics | None = None,
) -> Tensor:
    """Per-image in-distribution score (higher = more like the training data), shape ``(N,)``.

    ``reference`` (:func:`fit_reference` on held-out in-distribution images) is needed for the
    ``typicality`` and ``class_typicality`` scores only.

    Raises:
        ValueError: ``score`` is not one of :data:`OOD_SCORES`, or ``reference`` is missing for it.
    """
    _check_score(score, reference)
    statistics = model_statistics(model, images, batch_size=batch_size)
    return scores_from_statistics(statistics, images, score, reference=reference)


def auroc(in_scores: Tensor, out_scores: Tensor, *, what: str = "scores") -> float:
    """AUROC of telling in-distribution (positive) from OOD by a score where higher means "in".

    Raises:
        ValueError: either side is empty or not 1-D, or holds a NaN or infinite score; the message starts
            with ``what`` (:meth:`OODScores.aurocs` passes the score's and the OOD set's names).
    """
    for side, side_scores in (("in-distribution", in_scores), ("out-of-distribution", out_scores)):
        if side_scores.ndim != 1 or len(side_scores) == 0:
            raise ValueError(
                f"{what}: the {side} scores must be a non-empty (N,) tensor, got {tuple(side_scores.shape)}"
            )
        bad = int((~torch.isfinite(side_scores)).sum())
        if bad:
            raise ValueError(f"{what}: {bad} of {len(side_scores)} {side} scores are NaN or infinite")
    labels = np.concatenate([np.ones(len(in_scores)), np.zeros(len(out_scores))])
    values = torch.cat([in_scores, out_scores]).double().numpy()
    return float(roc_auc_score(labels, values))


def digits_images(image_shape: Sequence[int]) -> Tensor:
    """scikit-learn's 1,797 real handwritten 8×8 digits, upscaled (bilinear) to ``image_shape`` in [0, 1].

    The digits are ink-bright on black, like MNIST and Fashion-MNIST; for colour shapes the grey image
    is repeated over the channels.
    """
    from sklearn.datasets import load_digits

    channels, height, width = image_shape
    digits = torch.from_numpy(load_digits().images).float().div_(16.0).unsqueeze(1)  # (1797, 1, 8, 8)
    upscaled = F.interpolate(digits, size=(height, width), mode="bilinear", align_corners=False)
    return upscaled.clamp_(0.0, 1.0).expand(-1, channels, -1, -1).contiguous()


def photo_patches(image_shape: Sequence[int], n: int, *, generator: torch.Generator) -> Tensor:
    """``n`` patches of scikit-learn's two bundled photographs (a temple, a flower) in [0, 1].

    Each patch is a random square of three times the image's side, area-downscaled to ``image_shape``
    ``(C, H, W)``: natural-image texture and edges at the scale of the images; grey (the mean of the
    RGB channels) for one channel. Half the patches come from each photograph.
    """
    from sklearn.datasets import load_sample_images

    channels, height, width = image_shape
    if channels not in (1, 3):
        raise ValueError(f"photo patches are grey or RGB images, not {channels} channels")
    side = 3 * max(height, width)
    patches = []
    for k, photo in enumerate(load_sample_images().images):  # (H, W, 3) uint8
        pixels = torch.tensor(photo, dtype=torch.float32).div_(255.0).permute(2, 0, 1)
        if channels == 1:
            pixels = pixels.mean(dim=0, keepdim=True)
        count = n // 2 + (n % 2 if k == 0 else 0)
        tops = torch.randint(0, pixels.shape[1] - side + 1, (count,), generator=generator).tolist()
        lefts = torch.randint(0, pixels.shape[2] - side + 1, (count,), generator=generator).tolist()
        crops = torch.stack([pixels[:, t : t + side, u : u + side] for t, u in zip(tops, lefts, strict=True)])
        patches.append(F.interpolate(crops, size=(height, width), mode="area"))
    return torch.cat(patches).clamp_(0.0, 1.0)


def ood_sets(images: Tensor, *, generator: torch.Generator, n_photo_patches: int = 2000) -> dict[str, Tensor]:
    """Out-of-distribution sets made from [0, 1] test ``images`` ``(N, C, H, W)`` and bundled data.

    ``uniform_noise`` (N images), ``hflip``, ``vflip`` and ``inverted`` (1 − x) of the test images,
    ``sklearn_digits`` (real handwriting from another source) and ``photo_patches`` (natural images,
    :func:`photo_patches`).
    """
    return {
        "uniform_noise": torch.rand(images.shape, generator=generator),
        "hflip": images.flip(-1),
        "vflip": images.flip(-2),
        "inverted": 1.0 - images,
        "sklearn_digits": digits_images(images.shape[1:]),
        "photo_patches": photo_patches(images.shape[1:], n_photo_patches, generator=generator),
    }


@dataclass(frozen=True)
class OODScores:
    """Every OOD score of the in-distribution images and of each OOD set (higher = more "in").

    Attributes:
        in_distribution: ``{score: (N,)}`` for the in-distribution images.
        out_of_distribution: ``{ood_set: {score: (M,)}}`` for each OOD set.
    """

    in_distribution: dict[str, Tensor]
    out_of_distribution: dict[str, dict[str, Tensor]]

    def aurocs(self) -> dict[str, dict[str, float]]:
        """``{score: {ood_set: AUROC}}``, the in-distribution images the positive class (:func:`auroc`)."""
        return {
            score: {
                name: auroc(in_scores, out[score], what=f"score {score!r} on the OOD set {name!r}")
                for name, out in self.out_of_distribution.items()
            }
            for score, in_scores in self.in_distribution.items()
        }

    def roc_curves(
        self, score: str, *, max_points: int = MAX_CURVE_POINTS
    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{ood_set: (fpr, tpr)}``: the thinned ROC curve of ``score`` against each OOD set.

        In-distribution images are the positives, as in :meth:`aurocs`: the false-positive rate is the
        share of OOD images taken for in-distribution ones.

        Raises:
            ValueError: ``score`` was not computed, or a score is NaN or infinite (naming score and set).
        """
        if score not in self.in_distribution:
            raise ValueError(f"no {score!r} scores computed; computed: {list(self.in_distribution)}")
        in_scores = self.in_distribution[score].double().numpy()
        curves = {}
        for name, out in self.out_of_distribution.items():
            out_scores = out[score].double().numpy()
            labels = np.concatenate([np.ones(len(in_scores)), np.zeros(len(out_scores))])
            try:
                curves[name] = roc_points(
                    labels, np.concatenate([in_scores, out_scores]), max_points=max_points
                )
            except ValueError as err:
                raise ValueError(f"score {score!r} on the OOD set {name!r}: {err}") from None
        return curves


def ood_scores(
    model: ClassConditionalEnergy,
    in_images: Tensor,
    out_sets: Mapping[str, Tensor],
    *,
    scores: Sequence[str] | None = None,
    batch_size: int = 500,
    reference_images: Tensor | None = None,
) -> OODScores:
    """Every requested OOD score of ``in_images`` and of each OOD set, one model pass per image set.

    ``reference_images`` (held-out in-distribution images, disjoint from ``in_images``) fit the
    ``typicality`` and ``class_typicality`` scores. ``scores`` defaults to every score the arguments
    allow: all of :data:`OOD_SCORES`, less those two without reference images; asking for them without
    reference images raises :class:`ValueError`.
    """
    reference = None
    if reference_images is not None:
        reference = fit_reference(model, reference_images, batch_size=batch_size)
    if scores is None:
        scores = [score for score in OOD_SCORES if reference is not None or score not in _FITTED_SCORES]
    for score in scores:  # unknown names and a fitted score without reference fail before any work
        _check_score(score, reference)

    def every_score(images: Tensor) -> dict[str, Tensor]:
        # one forward-backward pass per image set; every score is a column or a function of them
        statistics = model_statistics(model, images, batch_size=batch_size)
        return {s: scores_from_statistics(statistics, images, s, reference=reference) for s in scores}

    return OODScores(every_score(in_images), {name: every_score(images) for name, images in out_sets.items()})


def ood_aurocs(
    model: ClassConditionalEnergy,
    in_images: Tensor,
    out_sets: Mapping[str, Tensor],
    *,
    scores: Sequence[str] | None = None,
    batch_size: int = 500,
    reference_images: Tensor | None = None,
) -> dict[str, dict[str, float]]:
    """``{score: {ood_set: AUROC}}`` for every score and OOD set (:func:`ood_scores`, then AUROCs)."""
    return ood_scores(
        model, in_images, out_sets, scores=scores, batch_size=batch_size, reference_images=reference_images
    ).aurocs()


# --- sample quality -------------------------------------------------------------------------------


def penultimate_features(classifier: nn.Module, images: Tensor, *, batch_size: int = 500) -> Tensor:
    """The input of ``classifier``'s last linear layer for [0, 1] ``images``: ``(N, features)``.

    The classifier runs in eval mode, and each module gets its own mode back afterwards.
    """
    last_linear = [m for m in classifier.modules() if isinstance(m, nn.Linear)][-1]
    captured: list[Tensor] = []
    hook = last_linear.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0].detach()))
    device = _device_of(classifier)
    try:
        with frozen(classifier), torch.no_grad():
            for chunk in images.split(batch_size):
                classifier(chunk.to(device))
    finally:
        hook.remove()
    return torch.cat(captured).float().cpu()


def frechet_distance(features_a: Tensor, features_b: Tensor) -> float:
    """‖μ_a − μ_b‖² + tr(Σ_a + Σ_b − 2 (Σ_a Σ_b)^½) between Gaussians fitted to two feature sets.

    Raises:
        ValueError: a set is not ``(n, d)`` with n ≥ 2 (no covariance), the two differ in ``d``, or a
            feature is NaN or infinite (from diverged samples, say).
    """
    for features, name in ((features_a, "features_a"), (features_b, "features_b")):
        if features.ndim != 2 or len(features) < 2:
            raise ValueError(f"{name} must be (n, d) with n ≥ 2, got shape {tuple(features.shape)}")
        raise_if_rows_not_finite(features, name)
    if features_a.shape[1] != features_b.shape[1]:
        raise ValueError(f"feature sets differ in width: {features_a.shape[1]} and {features_b.shape[1]}")
    a, b = features_a.double().numpy(), features_b.double().numpy()
    mean_a, mean_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b)
    root = np.real(root)  # numerical noise gives tiny imaginary parts
    return float(np.sum((mean_a - mean_b) ** 2) + np.trace(cov_a + cov_b - 2.0 * root))


# --- annealed importance sampling -----------------------------------------------------------------


class TemperedLogitEnergy(nn.Module):
    """The AIS path in logit space: z ∈ ℝ^D, x = sigmoid(z) ∈ (0, 1)^D.

        E_β(z) = β · E(sigmoid(z)) − Σᵢ log sigmoid′(zᵢ)

    is the energy of p_β(x) ∝ exp(−β E(x)) on the box, carried to z by the change of variables: at β = 0
    it is the logistic density, the image of the uniform density on [0, 1]^D, so log Z₀ = 0 and
    Z_β is the same in both spaces. Chains in z never meet the box's walls, which in hundreds of
    dimensions would reject nearly every proposal of a sampler run in x.
    """

    def __init__(self, energy: nn.Module, beta: float = 1.0) -> None:
        super().__init__()
        self.energy = energy
        self.beta = beta

    def forward(self, z: Tensor) -> Tensor:
        log_jacobian = -(F.softplus(-z) + F.softplus(z)).flatten(1).sum(1)  # Σ log σ′(z), σ′ = σ(1 − σ)
        return self.beta * self.energy(torch.sigmoid(z)).float() - log_jacobian


@dataclass(frozen=True)
class AISConfig:
    """Annealed importance sampling settings.

    Attributes:
        n_chains: independent AIS runs (importance weights).
        n_temperatures: intermediate distributions β₁ < … < β_T = 1 (a sigmoid schedule).
        step_size: initial MALA step size in logit space; adapted between temperatures towards 50–75 %
            acceptance.
        mala_steps: MALA transitions per temperature.
    """

    n_chains: int = 64
    n_temperatures: int = 1000
    step_size: float = 0.01
    mala_steps: int = 1

    def __post_init__(self) -> None:
        # n_temperatures 0 ran no step and reported log Z = 0 ± 0; one chain has no standard error;
        # mala_steps 0 moved no chain and reported an acceptance rate of 0 for moves never proposed
        if self.n_chains < 2 or self.n_temperatures < 1 or self.mala_steps < 1:
            raise ValueError(
                f"AIS needs n_chains ≥ 2, n_temperatures ≥ 1 and mala_steps ≥ 1, got {self.n_chains}, "
                f"{self.n_temperatures} and {self.mala_steps}"
            )
        if not (math.isfinite(self.step_size) and self.step_size > 0):
            raise ValueError(f"AIS step_size must be a positive number, got {self.step_size}")


@dataclass(frozen=True)
class AISResult:
    """log Ẑ with its standard error, the effective sample size of the weights and MALA's acceptance."""

    log_partition: float
    standard_error: float
    effective_sample_size: float
    acceptance_rate: float


def sigmoid_schedule(n_temperatures: int, sharpness: float = 4.0) -> Tensor:
    """β₀ = 0 < β₁ < … < β_T = 1, denser near both ends (Grosse et al. 2015), shape ``(T + 1,)``."""
    if n_temperatures < 1:
        raise ValueError(f"n_temperatures must be ≥ 1, got {n_temperatures}")
    s = torch.sigmoid(torch.linspace(-sharpness, sharpness, n_temperatures + 1, dtype=torch.float64))
    return (s - s[0]) / (s[-1] - s[0])


def ais_log_partition(
    energy: nn.Module,
    event_shape: Sequence[int],
    config: AISConfig,
    *,
    generator: torch.Generator,
) -> AISResult:
    """Estimate log Z = log ∫_{[0,1]^D} exp(−E(x)) dx by AIS from the uniform density on the box.

    Raises:
        FloatingPointError: an energy at a chain's state, and so a log importance weight, came out NaN or
            infinite (with the temperature step and how many chains).
    """
    device = _device_of(energy)
    betas = sigmoid_schedule(config.n_temperatures)
    # A new module is in training mode; the sampler would restore that mode onto ``energy`` after each
    # run (with spectral norm, power iterations would then move the weights' normalisation).
    tempered = TemperedLogitEnergy(energy).train(energy.training)
    uniform = torch.rand((config.n_chains, *event_shape), generator=generator, device=device)
    z = torch.logit(uniform.clamp(1e-6, 1 - 1e-6))  # logistic draws: the uniform base in logit space
    log_weights = torch.zeros(config.n_chains, dtype=torch.float64, device=device)
    step_size, acceptance = config.step_size, []
    with frozen(energy):
        current = _energies(energy, torch.sigmoid(z))
        _raise_if_not_finite_energies(current, step=0, n_steps=config.n_temperatures, beta=0.0)
        for step, (previous_beta, beta) in enumerate(
            zip(betas[:-1].tolist(), betas[1:].tolist(), strict=True), start=1
        ):
            log_weights -= (beta - previous_beta) * current
            tempered.beta = beta
            z, stats = MALA(step_size).run(tempered, z, config.mala_steps, generator=generator)
            rate = float(stats.acceptance_rate)
            acceptance.append(rate)
            step_size *= 1.1 if rate > 0.75 else (0.9 if rate < 0.5 else 1.0)
            current = _energies(energy, torch.sigmoid(z))
            _raise_if_not_finite_energies(current, step=step, n_steps=config.n_temperatures, beta=beta)
    if not torch.isfinite(log_weights).all():
        bad = int((~torch.isfinite(log_weights)).sum())
        raise FloatingPointError(
            f"AIS produced a non-finite log importance weight on {bad} of {config.n_chains} chains"
        )
    log_mean = torch.logsumexp(log_weights, 0) - math.log(config.n_chains)
    normalised = torch.exp(log_weights - log_weights.max())
    standard_error = float(normalised.std() / (normalised.mean() * math.sqrt(config.n_chains)))
    ess = float(normalised.sum() ** 2 / normalised.square().sum())
    return AISResult(float(log_mean), standard_error, ess, float(np.mean(acceptance)))


def _energies(energy: nn.Module, x: Tensor) -> Tensor:
    with torch.no_grad():
        return energy(x).double()


def _raise_if_not_finite_energies(energies: Tensor, *, step: int, n_steps: int, beta: float) -> None:
    """Raise ``FloatingPointError`` if an AIS chain's energy is NaN or infinite (so its log weight is)."""
    bad = ~torch.isfinite(energies)
    if bad.any():
        example = float(energies[bad.nonzero()[0, 0]])
        raise FloatingPointError(
            f"AIS produced a non-finite log importance weight: the energy is not finite (e.g. {example}) on "
            f"{int(bad.sum())} of {energies.numel()} chains at temperature step {step} of {n_steps} "
            f"(β = {beta:.4g})"
        )


def bits_per_dim(mean_energy: float, log_partition: float, n_dims: int, *, levels: int = 256) -> float:
    """Test NLL in bits per dimension of 8-bit data: (E + log Z) / (D ln 2) + log₂ 256.

    ``mean_energy`` must be the mean energy of the test images *dequantised* as in training, pixel k
    at (k + u) / 256 with u ~ U[0, 1): the continuous density p on [0, 1]^D then gives each 8-bit
    image the probability ∫ p over its cell of volume 256^−D, and by Jensen's inequality
    E_u[−log p((k + u)/256)] + D log 256 bounds its negative log from above. The energy at the
    lattice points k / 255 themselves is no such bound.
    """
    return (mean_energy + log_partition) / (n_dims * math.log(2)) + math.log2(levels)
