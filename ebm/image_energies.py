"""Energies over images: a strided CNN for 28×28, a small ResNet for 32×32, and the image wrapper.

The networks produce class logits, so one network serves as a classifier and, through
:class:`~ebm.energies.ClassConditionalEnergy`, as E(x, y) = −logit_y(x) with the marginal
E(x) = −logsumexp_y logit_y(x) (JEM). With ``n_classes=1`` the single logit is −E(x).

:class:`ImageEnergy` puts preprocessing inside the model: it takes images as users have them, float
tensors in [0, 1] of shape ``(B, C, H, W)`` (torchvision's ``ToTensor`` convention), and maps them
to [−1, 1] itself, so a saved model needs no separate transform.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ebm.energies import ClassConditionalEnergy


def _maybe_sn(layer: nn.Module, spectral_norm: bool) -> nn.Module:
    return nn.utils.parametrizations.spectral_norm(layer) if spectral_norm else layer


def _check_positive_sizes(owner: str, **sizes: object) -> None:
    """Raise ``ValueError`` naming the first of ``sizes`` (a width, channel count, block count) that is
    not an int ≥ 1 (a bool is not one): a zero width builds, then fails at the first forward pass with a
    bare torch error, and zero residual blocks build a network with none."""
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}: {name} must be an int ≥ 1, got {value!r}")


@dataclass(frozen=True)
class CNN28Config:
    """The UvA deep-learning tutorial 8 family: four strided convolutions with Swish, then an MLP head.

    Attributes:
        in_channels: image channels (1 for MNIST / Fashion-MNIST).
        channels: widths of the four convolutions (28 → 16 → 8 → 4 → 2 pixels).
        hidden: width of the dense layer.
        n_classes: logits produced.
        spectral_norm: spectrally normalise every layer.
    """

    in_channels: int = 1
    channels: Sequence[int] = (32, 64, 64, 128)
    hidden: int = 128
    n_classes: int = 10
    spectral_norm: bool = False

    def __post_init__(self) -> None:
        if len(self.channels) != 4:
            raise ValueError(f"CNN28 has four convolutions; channels must list 4 widths, got {self.channels}")
        widths = {f"channels[{i}]": c for i, c in enumerate(self.channels)}
        _check_positive_sizes(
            "CNN28Config",
            in_channels=self.in_channels,
            **widths,
            hidden=self.hidden,
            n_classes=self.n_classes,
        )


class CNN28(nn.Module):
    """Strided-conv logits for 28×28 images: ``(B, C, 28, 28) → (B, n_classes)``."""

    def __init__(self, config: CNN28Config) -> None:
        super().__init__()
        c1, c2, c3, c4 = config.channels  # four ints ≥ 1: CNN28Config checks them
        sn = config.spectral_norm
        self.config = config
        self.features = nn.Sequential(
            _maybe_sn(nn.Conv2d(config.in_channels, c1, 5, stride=2, padding=4), sn),  # (B, c1, 16, 16)
            nn.SiLU(),
            _maybe_sn(nn.Conv2d(c1, c2, 3, stride=2, padding=1), sn),  # (B, c2, 8, 8)
            nn.SiLU(),
            _maybe_sn(nn.Conv2d(c2, c3, 3, stride=2, padding=1), sn),  # (B, c3, 4, 4)
            nn.SiLU(),
            _maybe_sn(nn.Conv2d(c3, c4, 3, stride=2, padding=1), sn),  # (B, c4, 2, 2)
            nn.SiLU(),
            nn.Flatten(1),
            _maybe_sn(nn.Linear(c4 * 4, config.hidden), sn),
            nn.SiLU(),
            _maybe_sn(nn.Linear(config.hidden, config.n_classes), sn),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)

    def as_sequential(self) -> nn.Sequential:
        """The chain ``forward`` runs, exactly (for :mod:`ebm.fastgrad`'s hand-written pass)."""
        return self.features


@dataclass(frozen=True)
class ResNet32Config:
    """A small pre-activation-free ResNet for 32×32 colour images (IGEBM/JEM-style, Swish, no BatchNorm).

    Attributes:
        in_channels: image channels (3 for CIFAR-10).
        width: channels of the first stage; each later stage doubles it.
        blocks_per_stage: residual blocks in each of the three stages (32 → 16 → 8 pixels).
        n_classes: logits produced.
        spectral_norm: spectrally normalise every convolution and the head.
    """

    in_channels: int = 3
    width: int = 32
    blocks_per_stage: int = 1
    n_classes: int = 10
    spectral_norm: bool = False

    def __post_init__(self) -> None:
        _check_positive_sizes(
            "ResNet32Config",
            in_channels=self.in_channels,
            width=self.width,
            blocks_per_stage=self.blocks_per_stage,
            n_classes=self.n_classes,
        )


class _ResidualBlock(nn.Module):
    def __init__(self, channels_in: int, channels_out: int, stride: int, spectral_norm: bool) -> None:
        super().__init__()
        self.conv1 = _maybe_sn(
            nn.Conv2d(channels_in, channels_out, 3, stride=stride, padding=1), spectral_norm
        )
        self.conv2 = _maybe_sn(nn.Conv2d(channels_out, channels_out, 3, padding=1), spectral_norm)
        self.act = nn.SiLU()
        self.skip: nn.Module = nn.Identity()
        if stride != 1 or channels_in != channels_out:
            self.skip = _maybe_sn(nn.Conv2d(channels_in, channels_out, 1, stride=stride), spectral_norm)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.skip(x) + self.conv2(self.act(self.conv1(x))))


class ResNet32(nn.Module):
    """Residual logits for 32×32 images: ``(B, C, 32, 32) → (B, n_classes)``."""

    def __init__(self, config: ResNet32Config) -> None:
        super().__init__()
        self.config = config
        sn = config.spectral_norm
        widths = [config.width, 2 * config.width, 4 * config.width]
        layers: list[nn.Module] = [
            _maybe_sn(nn.Conv2d(config.in_channels, widths[0], 3, padding=1), sn),
            nn.SiLU(),
        ]
        channels = widths[0]
        for stage, width in enumerate(widths):
            for block in range(config.blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                layers.append(_ResidualBlock(channels, width, stride, sn))
                channels = width
        self.features = nn.Sequential(*layers)  # (B, 4·width, 8, 8)
        self.head = _maybe_sn(nn.Linear(channels, config.n_classes), sn)

    def forward(self, x: Tensor) -> Tensor:
        # channels_last from the first convolution on: oneDNN's fastest layout on the CPU, and the one
        # ebm.fastconv computes frozen convolutions in (an NCHW input would be converted at every layer)
        x = x.contiguous(memory_format=torch.channels_last)
        pooled = self.features(x).mean(dim=(2, 3))  # (B, 4·width): global average pool
        return self.head(pooled)


class ImageEnergy(ClassConditionalEnergy):
    """A class-conditional energy over [0, 1] images, preprocessing included.

    ``forward(x)`` is the marginal energy E(x) = −logsumexp_y logit_y(2x − 1); ``joint(x, y)`` and
    ``logits(x)`` take the same [0, 1] images. :meth:`classify` returns the predicted labels.
    """

    input_scale = 2.0  # [0, 1] → [−1, 1]
    input_shift = -1.0

    def __init__(self, logits_net: nn.Module, image_shape: Sequence[int]) -> None:
        super().__init__(logits_net)
        self.image_shape = tuple(image_shape)

    def network_input(self, x: Tensor) -> Tensor:
        """``2x − 1`` for float [0, 1] images of this energy's shape.

        Raises:
            TypeError: ``x`` is not floating point (uint8 pixels 0–255 would score as values up to 509).
            ValueError: ``x`` is not ``(B, *image_shape)``.
        """
        if not x.is_floating_point():
            raise TypeError(
                f"images must be float tensors in [0, 1], got dtype {x.dtype} (for uint8 pixels, divide "
                "by 255: images.float() / 255)"
            )
        if tuple(x.shape[1:]) != self.image_shape:
            shape = ", ".join(map(str, self.image_shape))
            raise ValueError(f"expected [0, 1] images of shape (B, {shape}), got {tuple(x.shape)}")
        return super().network_input(x)

    def energy(self, x: Tensor) -> Tensor:
        """E(x) for [0, 1] images ``(B, C, H, W)`` → ``(B,)``; lower means more like the training data."""
        return self(x)

    @torch.no_grad()
    def classify(self, x: Tensor) -> Tensor:
        """Predicted labels ``(B,)``: the class of lowest energy E(x, y)."""
        return self.logits(x).argmax(dim=1)
