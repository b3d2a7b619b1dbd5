"""Image datasets (MNIST, Fashion-MNIST, CIFAR-10) through torchvision, into compact seeded splits.

The originals are read by torchvision's own classes (``MNIST``, ``FashionMNIST``, ``CIFAR10``), from one
of two places:

1. **A local copy of the original files** (``local_copy``; for Fashion-MNIST the default is the folder
   Debian's ``dataset-fashion-mnist`` package installs). IDX files, gzip'd or not, for the MNIST family;
   the ``cifar-10-batches-py`` pickle batches (or the ``cifar-10-python.tar.gz`` archive) for CIFAR-10.
   They are arranged, in a temporary folder, the way torchvision expects them
   (``<root>/<ClassName>/raw/*-ubyte``; ``<root>/cifar-10-batches-py/``): uncompressed files are linked,
   gzip'd ones decompressed (a ``.tar.gz`` is unpacked refusing members that lead outside the folder).
   No network is touched. A relative ``local_copy`` lies under the project root, as ``download_root`` does.
2. **torchvision's download** into ``download_root`` when there is no local copy: none named and the
   system copy not installed. A ``local_copy`` named in the config that is not a folder is an error.
   Files already in ``download_root`` are read without downloading, and recorded as the official release
   (``official_checksums``) only when they match the MD5 sums torchvision publishes; a corrupt one is named.

Offline with no local copy, :class:`ImageDataUnavailableError` says both ways out.

:func:`prepare_image_data` splits the original training set into train and validation with a seeded
permutation (the test set stays the test set), and writes ``train.pt``, ``validation.pt`` and
``test.pt`` (uint8 images ``(N, C, H, W)``, int64 labels, and each row's index in the original file) plus
``manifest.json``, which records the source, the seed, the counts and every file's SHA-256.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import shutil
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, NoReturn
from urllib.error import URLError

import numpy as np
import torch
from torch import Tensor
from torchvision import datasets
from torchvision.datasets import mnist

from ebm.checkpoint import atomic_write, torch_save

SPLITS = ("train", "validation", "test")
IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")
# What torchvision's readers raise for a truncated or malformed file (IDX asserts its header).
TORCHVISION_READ_ERRORS = (
    RuntimeError,
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AssertionError,
    EOFError,
    pickle.UnpicklingError,
)


class ImageDataUnavailableError(RuntimeError):
    """Neither a local copy of the original files nor torchvision's download could provide a dataset."""


@dataclass(frozen=True)
class ImageDatasetSpec:
    """One dataset: the torchvision class that reads it, its shape, classes and file format.

    Attributes:
        name: the name used in ``params.yaml``.
        torchvision_class: the class in ``torchvision.datasets``.
        image_shape: ``(C, H, W)``.
        n_classes: number of labels.
        file_format: ``"idx"`` (MNIST family) or ``"cifar-python"`` (pickle batches).
        system_copy: where a distribution package installs the original files, if one does.
    """

    name: str
    torchvision_class: str
    image_shape: tuple[int, int, int]
    n_classes: int
    file_format: Literal["idx", "cifar-python"]
    system_copy: str | None = None


IMAGE_DATASETS: dict[str, ImageDatasetSpec] = {
    "mnist": ImageDatasetSpec("mnist", "MNIST", (1, 28, 28), 10, "idx"),
    "fashion_mnist": ImageDatasetSpec(
        "fashion_mnist", "FashionMNIST", (1, 28, 28), 10, "idx", "/usr/share/datasets/fashion-mnist"
    ),
    "cifar10": ImageDatasetSpec("cifar10", "CIFAR10", (3, 32, 32), 10, "cifar-python"),
}


def image_dataset(name: str) -> ImageDatasetSpec:
    """The spec of a dataset by its config name; raises listing the valid names."""
    if name not in IMAGE_DATASETS:
        raise ValueError(f"unknown image dataset {name!r}; choose one of {sorted(IMAGE_DATASETS)}")
    return IMAGE_DATASETS[name]


@dataclass(frozen=True)
class ImageDataConfig:
    """Where the originals come from and how they are split (``params.yaml``: ``images.data``).

    Attributes:
        dataset: ``mnist``, ``fashion_mnist`` or ``cifar10``.
        local_copy: folder holding the original files (relative: under the project root); ``None`` means the
            dataset's system copy (Debian's ``dataset-fashion-mnist`` for Fashion-MNIST) where there is one. A
            named folder that is missing (or a file) is an error; only the system copy, when not installed,
            falls back to the download.
        download: let torchvision download the originals when no local copy is found.
        download_root: torchvision's download folder (relative: under the project root).
        n_validation: images moved from the original training set into the validation split.
        max_train: keep at most this many training images (``None``: all); for quick runs.
        max_test: keep at most this many test images (``None``: all), a seeded subset.
    """

    dataset: str = "fashion_mnist"
    local_copy: str | None = None
    download: bool = True
    download_root: str = "data/downloads"
    n_validation: int = 5000
    max_train: int | None = None
    max_test: int | None = None

    def __post_init__(self) -> None:
        image_dataset(self.dataset)
        if self.n_validation < 0 or any(n is not None and n < 1 for n in (self.max_train, self.max_test)):
            raise ValueError("n_validation ≥ 0 and max_train, max_test ≥ 1 (or None) are required")


@dataclass(frozen=True)
class OriginalImages:
    """The original training and test sets as uint8 ``(N, C, H, W)`` images and int64 labels."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    source: str
    # None: not checkable (a local copy's re-compressed or uncompressed IDX files)
    official_checksums: bool | None
    source_sha256: dict[str, str]  # SHA-256 of each (uncompressed) original file torchvision read


@dataclass(frozen=True)
class ImageSplit:
    """One prepared split: uint8 images ``(N, C, H, W)``, int64 labels ``(N,)``, original row indices."""

    images: Tensor
    labels: Tensor
    source_indices: Tensor

    def unit(self) -> Tensor:
        """The images as float [0, 1] tensors (torchvision's ``ToTensor`` convention: k / 255)."""
        return self.images.float().div_(255.0)


# --- reading the originals ------------------------------------------------------------------------


def load_original(config: ImageDataConfig, *, project_root: Path = Path(".")) -> OriginalImages:
    """Read the original train and test sets: from the local copy if there is one, else downloaded.

    A ``local_copy`` named in the config must be a folder (a relative one lies under ``project_root``, as
    ``download_root`` does); only the dataset's system copy (the default, whether left ``None`` or named)
    falls back quietly to the download when it is not installed. Files already in ``download_root`` are
    read without downloading (torchvision's own rule), and are recorded as the official release only when
    they match the MD5 sums torchvision publishes for it.

    Raises:
        ImageDataUnavailableError: the named local copy is not a folder; no local copy and the download is off
            or failed (offline); or a file of the originals is unreadable or inconsistent (named).
    """
    spec = image_dataset(config.dataset)
    named = project_root / config.local_copy if config.local_copy else None
    local = named or (Path(spec.system_copy) if spec.system_copy else None)
    download_root = project_root / config.download_root
    if local is not None and local.is_dir():
        with tempfile.TemporaryDirectory(prefix="ebm-images-") as root:
            checksums, origins = _arrange_local_copy(spec, local, Path(root))
            source = f"local copy {config.local_copy or spec.system_copy}"
            return _read_torchvision(spec, Path(root), source, checksums, origins)
    how = (
        f"put the original files in a folder and name it in params.yaml (images.data.local_copy; "
        f"{_expected_files(spec)}), or let torchvision download them (images.data.local_copy: null, "
        f"images.data.download: true, needs the network) into {download_root}"
    )
    if config.local_copy and named is not None and not _is_system_copy(spec, named):
        state = "is a file, not a folder" if named.exists() else "does not exist"
        given = "" if Path(config.local_copy).is_absolute() else f" {config.local_copy!r} in the project root"
        raise ImageDataUnavailableError(
            f"the local copy {named} of {spec.name} (images.data.local_copy{given}) {state}: {how}"
        )
    where = f"no local copy of {spec.name} at {local}" if local else f"no local copy of {spec.name} named"
    if not config.download:
        raise ImageDataUnavailableError(f"{where} and downloading is off: {how}")
    downloaded = _download(spec, download_root, f"{where}, and torchvision's download failed", how)
    official: bool | None = None  # CIFAR-10: decided when reading, as torchvision checks the MD5 sums itself
    if spec.file_format == "idx":
        official = _official_idx_download(spec, download_root / spec.torchvision_class / "raw")
    source = (
        "torchvision download"
        if downloaded
        else f"download folder {config.download_root} (files already there, not downloaded now)"
    )
    try:
        return _read_torchvision(spec, download_root, source, official, None)
    except ImageDataUnavailableError as err:
        raise ImageDataUnavailableError(
            f"{err}; it lies in torchvision's download folder {download_root}: delete the file named and "
            f"rerun, and torchvision downloads it again"
        ) from err


def _download(spec: ImageDatasetSpec, download_root: Path, failed: str, how: str) -> bool:
    """Let torchvision download the originals into ``download_root`` unless they are there already.

    torchvision skips its download when the files it reads exist (the MNIST family: the four IDX files,
    whatever they hold; CIFAR-10: batches matching its MD5 sums); the same test is made here first, so a
    file already there is read (and any fault in it named) rather than blamed on the network.

    Returns:
        Whether torchvision downloaded anything.

    Raises:
        ImageDataUnavailableError: the download was needed and failed (``failed`` and ``how`` say so).
    """

    def present() -> bool:
        if spec.file_format == "idx":
            raw = download_root / spec.torchvision_class / "raw"
            return all((raw / name).is_file() for name in IDX_FILES)
        folder = download_root / CIFAR_FOLDER
        return all(
            datasets.utils.check_integrity(str(folder / name), md5)
            for name, md5 in (*datasets.CIFAR10.train_list, *datasets.CIFAR10.test_list)
        )

    try:
        _self_ignoring_folder(download_root)
        if present():
            return False
        # Downloads every file of the dataset, then reads the (smaller) test set; a fault in reading is
        # left to the reading that follows, which names the file.
        getattr(datasets, spec.torchvision_class)(str(download_root), train=False, download=True)
    except (*TORCHVISION_READ_ERRORS, OSError, URLError) as err:
        if not present():
            raise ImageDataUnavailableError(f"{failed} ({err}): {how}") from err
    if not present():
        raise ImageDataUnavailableError(
            f"{failed} (it raised no error, yet {download_root} lacks the files: {_expected_files(spec)}): "
            f"{how}"
        )
    return True


def _official_idx_download(spec: ImageDatasetSpec, raw: Path) -> bool:
    """Whether the IDX files in torchvision's download folder ``raw`` are the official release.

    torchvision publishes MD5 sums of the ``.gz`` files (its class's ``resources``) and keeps each ``.gz``
    beside the file it unpacked and reads: both must be there, the ``.gz`` must match its sum and unpack to
    exactly the file read.
    """
    official_md5 = dict(getattr(datasets, spec.torchvision_class).resources)
    for name in IDX_FILES:
        packed = raw / f"{name}.gz"
        if not packed.is_file() or _md5(packed) != official_md5.get(f"{name}.gz"):
            return False
        try:
            with gzip.open(packed, "rb") as source:
                unpacked = _digest_stream(source, hashlib.sha256())
        except (OSError, EOFError, zlib.error):  # gzip.BadGzipFile is an OSError
            return False
        if unpacked != _sha256(raw / name):
            return False
    return True


def _is_system_copy(spec: ImageDatasetSpec, local: Path) -> bool:
    """Whether ``local`` (under the project root if relative) names the dataset's system copy.

    ``params.yaml`` names Debian's explicitly; naming it is the same as leaving ``local_copy`` unset.
    """
    return spec.system_copy is not None and local == Path(spec.system_copy)


def _expected_files(spec: ImageDatasetSpec) -> str:
    if spec.file_format == "idx":
        return "expects " + ", ".join(f"{name}[.gz]" for name in IDX_FILES)
    return f"expects {CIFAR_FOLDER}/ with data_batch_1..5, test_batch, batches.meta, or {CIFAR_ARCHIVE}"


def _self_ignoring_folder(folder: Path) -> None:
    """Create the download folder with a ``.gitignore`` of ``*``, so downloads never reach git."""
    folder.mkdir(parents=True, exist_ok=True)
    ignore = folder / ".gitignore"
    if not ignore.exists():
        ignore.write_text("*\n")


def _arrange_local_copy(
    spec: ImageDatasetSpec, local: Path, root: Path
) -> tuple[bool | None, dict[str, str]]:
    """Lay the local copy out under ``root`` as torchvision expects.

    Returns:
        Whether the checksums match the official release (``None``: not checkable yet), and where each file
        torchvision reads came from (file name → the path in the local copy, for error messages).
    """
    if spec.file_format == "idx":
        return _arrange_idx(spec, local, root / spec.torchvision_class / "raw")
    return _arrange_cifar(local, root)


def _arrange_idx(spec: ImageDatasetSpec, local: Path, raw: Path) -> tuple[bool | None, dict[str, str]]:
    official_md5 = dict(getattr(datasets, spec.torchvision_class).resources)
    raw.mkdir(parents=True)
    candidates = [local, local / "raw", local / spec.torchvision_class / "raw"]
    matches: list[bool] = []
    origins: dict[str, str] = {}
    for name in IDX_FILES:
        # torchvision lists MD5 sums of the .gz files; a re-compressed copy (Debian's) differs in its
        # gzip header only, so a mismatch is "not checkable", not "corrupt": contents are hashed anyway.
        plain = next((folder / name for folder in candidates if (folder / name).is_file()), None)
        packed = next(
            (folder / f"{name}.gz" for folder in candidates if (folder / f"{name}.gz").is_file()), None
        )
        if plain is not None:
            os.symlink(plain.resolve(), raw / name)
            origins[name] = str(plain)
        elif packed is not None:
            matches.append(_md5(packed) == official_md5.get(f"{name}.gz"))
            try:
                with gzip.open(packed, "rb") as source, open(raw / name, "wb") as target:
                    shutil.copyfileobj(source, target)
            except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
                raise ImageDataUnavailableError(
                    f"{packed} is not a readable gzip file ({type(err).__name__}: {err})"
                ) from err
            origins[name] = str(packed)
        else:
            raise ImageDataUnavailableError(
                f"the local copy {local} of {spec.name} lacks {name} (or {name}.gz); {_expected_files(spec)}"
            )
    return (True if len(matches) == len(IDX_FILES) and all(matches) else None), origins


def _arrange_cifar(local: Path, root: Path) -> tuple[bool | None, dict[str, str]]:
    if (local / CIFAR_FOLDER).is_dir():
        os.symlink((local / CIFAR_FOLDER).resolve(), root / CIFAR_FOLDER)
        origins = {name: str(local / CIFAR_FOLDER / name) for name in CIFAR_FILES}
    elif (local / "data_batch_1").is_file():
        os.symlink(local.resolve(), root / CIFAR_FOLDER)
        origins = {name: str(local / name) for name in CIFAR_FILES}
    elif (local / CIFAR_ARCHIVE).is_file():
        archive = local / CIFAR_ARCHIVE
        _extract_tar(archive, root)
        origins = {name: f"{archive} (member {CIFAR_FOLDER}/{name})" for name in CIFAR_FILES}
    else:
        raise ImageDataUnavailableError(
            f"the local copy {local} of cifar10 holds neither {CIFAR_FOLDER}/, its batch files nor "
            f"{CIFAR_ARCHIVE}"
        )
    for name in CIFAR_FILES:
        if not (root / CIFAR_FOLDER / name).is_file():
            raise ImageDataUnavailableError(
                f"the local copy {local} of cifar10 lacks {origins[name]}; "
                f"{_expected_files(IMAGE_DATASETS['cifar10'])}"
            )
    return None, origins  # decided when reading: torchvision checks the batches' MD5 sums itself


MAX_CIFAR_MEMBER_BYTES = 64 * 2**20
"""The largest archive member unpacked; the official batches are ~31 MB each."""


def _extract_tar(archive: Path, dest: Path) -> None:
    """Unpack CIFAR-10's seven files from ``archive`` into ``dest``, and nothing else.

    Other members are skipped (an archive padded with a huge file would fill the disk), a wanted member
    larger than :data:`MAX_CIFAR_MEMBER_BYTES` or not a plain file is refused, and so is any member that
    would be written outside ``dest``: tarfile's ``data`` filter (Python ≥ 3.11.4) refuses ``..`` paths,
    links leading out and device files; before it, each member's resolved path is checked here.

    Raises:
        ImageDataUnavailableError: the archive is unreadable, or a member is refused (both named).
    """
    wanted = {f"{CIFAR_FOLDER}/{name}" for name in CIFAR_FILES}
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = [m for m in tar.getmembers() if m.name.removeprefix("./").lstrip("/") in wanted]
            for member in members:
                if not member.isfile():
                    _refuse_member(archive, member.name, "not a plain file")
                if member.size > MAX_CIFAR_MEMBER_BYTES:
                    _refuse_member(
                        archive, member.name, f"{member.size:,} bytes, more than any CIFAR-10 file"
                    )
            if hasattr(tarfile, "data_filter"):
                try:
                    tar.extractall(dest, members=members, filter="data")
                except tarfile.FilterError as err:
                    _refuse_member(archive, err.tarinfo.name, str(err))
                return
            inside = dest.resolve()
            for member in members:
                target = (inside / member.name).resolve()
                if not (member.isfile() or member.isdir()):
                    _refuse_member(archive, member.name, "not a plain file or folder")
                if target != inside and inside not in target.parents:
                    _refuse_member(archive, member.name, f"it would be extracted to {target}")
            tar.extractall(dest, members=members)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        raise ImageDataUnavailableError(
            f"{archive} is not a readable tar.gz archive ({type(err).__name__}: {err})"
        ) from err


def _refuse_member(archive: Path, member: str, why: str) -> NoReturn:
    """Refuse the archive for one member (a path or link leading out of the folder, or a device file)."""
    raise ImageDataUnavailableError(
        f"{archive} holds member {member!r}, which may not be unpacked ({why}): members must be files and "
        f"folders that stay inside the folder they are unpacked into; nothing was written outside it. Use "
        f"the official {CIFAR_ARCHIVE} or its unpacked {CIFAR_FOLDER}/"
    )


def _read_torchvision(
    spec: ImageDatasetSpec,
    root: Path,
    source: str,
    checksums: bool | None,
    origins: dict[str, str] | None,
) -> OriginalImages:
    """Read the files under ``root`` with torchvision's class for ``spec``, and check what it read.

    ``origins`` maps each file name to where it came from (``None``: the files under ``root`` are the
    originals); errors name those paths. torchvision never downloads here (:func:`_download` did that):
    its errors are re-raised as :class:`ImageDataUnavailableError` naming the file.
    """
    dataset_class = getattr(datasets, spec.torchvision_class)
    if spec.file_format == "idx":
        raw = root / spec.torchvision_class / "raw"
        where = origins or {name: str(raw / name) for name in IDX_FILES}
        train, test = (_read_idx(dataset_class, root, raw, where, train=flag) for flag in (True, False))
        original = OriginalImages(
            train.data.unsqueeze(1).contiguous(),  # (N, 1, 28, 28)
            train.targets.to(torch.int64),
            test.data.unsqueeze(1).contiguous(),
            test.targets.to(torch.int64),
            source,
            checksums,
            {name: _sha256(raw / name) for name in IDX_FILES},
        )
        _check_original(
            spec,
            original,
            (where[IDX_FILES[0]], where[IDX_FILES[1]]),
            (where[IDX_FILES[2]], where[IDX_FILES[3]]),
        )
        return original
    folder = root / CIFAR_FOLDER
    where = origins or {name: str(folder / name) for name in CIFAR_FILES}
    for name in CIFAR_FILES:
        _check_cifar_file(folder / name, where[name], spec.n_classes, meta=name == CIFAR_FILES[-1])
    try:
        train, test = (dataset_class(str(root), train=flag) for flag in (True, False))
        checksums = True
    except RuntimeError:
        # Not the official release's bytes (a subset, a re-pickled copy): the same torchvision code reads
        # them with its MD5 checks off, and the manifest records that they differ.
        try:
            train, test = (UncheckedCIFAR10(str(root), train=flag) for flag in (True, False))
        except TORCHVISION_READ_ERRORS as err:
            raise ImageDataUnavailableError(
                f"torchvision could not read the CIFAR-10 batches of the {source} "
                f"({', '.join(where[name] for name in CIFAR_FILES)}): {type(err).__name__}: {err}"
            ) from err
        checksums = False
    original = OriginalImages(
        torch.from_numpy(train.data).permute(0, 3, 1, 2).contiguous(),  # (N, 32, 32, 3) → (N, 3, 32, 32)
        torch.as_tensor(train.targets, dtype=torch.int64),
        torch.from_numpy(test.data).permute(0, 3, 1, 2).contiguous(),
        torch.as_tensor(test.targets, dtype=torch.int64),
        source,
        checksums,
        {
            name: _sha256(root / CIFAR_FOLDER / name)
            for name, _ in (*train.train_list, *train.test_list, (train.meta["filename"], None))
        },
    )
    train_files = ", ".join(where[name] for name in CIFAR_FILES[:5])
    _check_original(spec, original, (train_files, train_files), (where["test_batch"], where["test_batch"]))
    return original


def _read_idx(dataset_class: Any, root: Path, raw: Path, where: dict[str, str], *, train: bool) -> Any:
    """torchvision's MNIST-family reader for one split; a file it cannot read is named in the error."""
    try:
        return dataset_class(str(root), train=train)
    except TORCHVISION_READ_ERRORS as err:
        prefix = "train" if train else "t10k"
        readers = (
            (f"{prefix}-images-idx3-ubyte", mnist.read_image_file),
            (f"{prefix}-labels-idx1-ubyte", mnist.read_label_file),
        )
        culprit = where[readers[1][0]]
        for name, reader in readers:  # torchvision reads the two files in turn: which one failed?
            try:
                reader(str(raw / name))
            except TORCHVISION_READ_ERRORS:
                culprit = where[name]
                break
        raise ImageDataUnavailableError(
            f"{culprit} is not a readable IDX file (truncated, corrupt, or not in the IDX format): "
            f"{type(err).__name__}{f': {err}' if str(err) else ''}"
        ) from err


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler for CIFAR-10's batches: dicts, lists, strings and NumPy arrays, no other objects."""

    ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),  # how NumPy pickles an array (the official files)
            ("numpy._core.multiarray", "_reconstruct"),  # the same under NumPy 2
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),  # bytes pickled by Python 3 at protocol 2
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(
                f"refused to load {module}.{name}: a CIFAR-10 batch holds only arrays"
            )
        return super().find_class(module, name)


def _check_cifar_file(path: Path, where: str, n_classes: int, *, meta: bool) -> None:
    """Check one CIFAR-10 pickle as torchvision will read it: a batch's ``data`` rows and ``labels`` pair up.

    torchvision concatenates the five training batches, so a batch with more labels than images would
    shift every label after it onto the wrong image; each batch is checked on its own here.

    The pickle is read by :class:`_CifarUnpickler`, which builds NumPy arrays and nothing else: a pickle
    that names any other callable is refused before it runs (torchvision's own plain ``pickle.load``
    then reads only files that passed).
    """
    try:
        with open(path, "rb") as handle:
            entry = _CifarUnpickler(handle, encoding="latin1").load()
    except Exception as err:  # a corrupt pickle raises many types (UnpicklingError, EOFError, ...)
        raise ImageDataUnavailableError(
            f"{where} is not a readable CIFAR-10 pickle ({type(err).__name__}: {err})"
        ) from err
    if meta:
        if not isinstance(entry, dict) or "label_names" not in entry:
            raise ImageDataUnavailableError(f"{where} is not CIFAR-10's batches.meta (no 'label_names')")
        return
    has_labels = isinstance(entry, dict) and ("labels" in entry or "fine_labels" in entry)
    if not isinstance(entry, dict) or "data" not in entry or not has_labels:
        raise ImageDataUnavailableError(
            f"{where} is not a CIFAR-10 batch: expected a dict with 'data' and 'labels', "
            f"got {sorted(entry) if isinstance(entry, dict) else type(entry).__name__}"
        )
    data = entry["data"]
    width = 3 * 32 * 32
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != width:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ImageDataUnavailableError(
            f"{where}: 'data' should be uint8 rows of {width} bytes (3 × 32 × 32 per image), got {got}"
        )
    labels = np.asarray(entry["labels"] if "labels" in entry else entry["fine_labels"])
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ImageDataUnavailableError(
            f"{where}: 'labels' should be a list of whole numbers, got {labels.dtype} {labels.shape}"
        )
    if labels.shape[0] != data.shape[0]:
        raise ImageDataUnavailableError(f"{where} holds {labels.shape[0]} labels for {data.shape[0]} images")
    outside = np.flatnonzero((labels < 0) | (labels >= n_classes))
    if outside.size:
        raise ImageDataUnavailableError(
            f"{where} holds label {int(labels[outside[0]])} at row {int(outside[0])}; "
            f"cifar10 labels lie in 0..{n_classes - 1}"
        )


def _check_original(
    spec: ImageDatasetSpec,
    original: OriginalImages,
    train_files: tuple[str, str],
    test_files: tuple[str, str],
) -> None:
    """Each set's images have the spec's shape, one label each, every label one of the spec's classes.

    ``train_files`` and ``test_files`` are ``(images file, labels file)``, named in the errors.
    """
    for images, labels, (image_file, label_file) in (
        (original.train_images, original.train_labels, train_files),
        (original.test_images, original.test_labels, test_files),
    ):
        if tuple(images.shape[1:]) != spec.image_shape:
            raise ImageDataUnavailableError(
                f"{image_file} holds images of shape {tuple(images.shape[1:])}; "
                f"{spec.name} images are {spec.image_shape}"
            )
        if labels.shape[0] != images.shape[0]:
            raise ImageDataUnavailableError(
                f"{label_file} holds {labels.shape[0]} labels for {images.shape[0]} images ({image_file})"
            )
        outside = ((labels < 0) | (labels >= spec.n_classes)).nonzero().flatten()
        if outside.numel():
            row = int(outside[0])
            raise ImageDataUnavailableError(
                f"{label_file} holds label {int(labels[row])} at row {row}; "
                f"{spec.name} labels lie in 0..{spec.n_classes - 1}"
            )


class UncheckedCIFAR10(datasets.CIFAR10):
    """torchvision's CIFAR-10 reader with its MD5 checks off (``check_integrity(path, None)``)."""

    train_list: ClassVar = [[name, None] for name, _ in datasets.CIFAR10.train_list]
    test_list: ClassVar = [[name, None] for name, _ in datasets.CIFAR10.test_list]
    meta: ClassVar = {**datasets.CIFAR10.meta, "md5": None}


def _md5(path: Path) -> str:
    return _digest(path, hashlib.md5())


def _sha256(path: Path) -> str:
    return _digest(path, hashlib.sha256())


def _digest(path: Path, digest: Any) -> str:
    with open(path, "rb") as handle:
        return _digest_stream(handle, digest)


def _digest_stream(handle: Any, digest: Any) -> str:
    for chunk in iter(lambda: handle.read(1 << 20), b""):
        digest.update(chunk)
    return digest.hexdigest()


# --- splits -----------------------------------------------------------------------------------------


def split_original(original: OriginalImages, config: ImageDataConfig, *, seed: int) -> dict[str, ImageSplit]:
    """Seeded train/validation split of the original training set, plus the (optionally subset) test set."""
    n_original = original.train_images.shape[0]
    if config.n_validation >= n_original:
        raise ValueError(f"n_validation = {config.n_validation} leaves no training images of {n_original}")
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n_original, generator=generator)
    validation, train = order[: config.n_validation], order[config.n_validation :]
    if config.max_train is not None:
        train = train[: config.max_train]
    test = torch.arange(original.test_images.shape[0])
    if config.max_test is not None:
        test = torch.randperm(test.numel(), generator=generator)[: config.max_test]
    return {
        "train": _take(original.train_images, original.train_labels, train),
        "validation": _take(original.train_images, original.train_labels, validation),
        "test": _take(original.test_images, original.test_labels, test),
    }


def _take(images: Tensor, labels: Tensor, rows: Tensor) -> ImageSplit:
    return ImageSplit(images[rows].contiguous(), labels[rows].contiguous(), rows)


def prepare_image_data(
    config: ImageDataConfig, out_dir: Path, *, seed: int, project_root: Path = Path(".")
) -> dict[str, Any]:
    """Read the originals, split them, write ``<out_dir>/{train,validation,test}.pt`` and the manifest.

    Returns:
        The manifest written to ``<out_dir>/manifest.json``.
    """
    spec = image_dataset(config.dataset)
    original = load_original(config, project_root=project_root)  # checks shapes, label counts and range
    splits = split_original(original, config, seed=seed)
    files: dict[str, dict[str, Any]] = {}
    for name, split in splits.items():
        path = out_dir / f"{name}.pt"
        torch_save(
            {"images": split.images, "labels": split.labels, "source_indices": split.source_indices}, path
        )
        files[name] = {
            "file": path.name,
            "count": int(split.images.shape[0]),
            "class_counts": torch.bincount(split.labels, minlength=spec.n_classes).tolist(),
            "sha256": _sha256(path),
        }
    manifest = {
        "dataset": spec.name,
        "image_shape": list(spec.image_shape),
        "n_classes": spec.n_classes,
        "source": original.source,
        "official_checksums": original.official_checksums,
        "source_sha256": original.source_sha256,
        "seed": seed,
        "split_rule": (
            "validation = first n_validation of torch.randperm(n_train_original, seed); train = the rest "
            "(first max_train of it); test = the original test set (a seeded subset of max_test)"
        ),
        "splits": files,
    }
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"

    def write_manifest(tmp: str) -> None:
        Path(tmp).write_text(text)

    atomic_write(out_dir / "manifest.json", write_manifest)
    return manifest


def load_image_split(data_dir: Path, split: str) -> ImageSplit:
    """Read one prepared split (``train``, ``validation``, ``test``) that :func:`prepare_image_data` wrote.

    With the folder's ``manifest.json`` beside it (as :func:`prepare_image_data` writes it), the file
    must also be the one the manifest lists (its SHA-256), and its images and labels must fit the
    manifest's image shape and class count.

    Raises:
        FileNotFoundError: the split was not prepared.
        ValueError: the file is unreadable, does not hold what :func:`prepare_image_data` writes (uint8
            images ``(N, C, H, W)``, int64 labels ``(N,)`` ≥ 0, int64 source indices ``(N,)``), or was
            changed after it was written; names it.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {list(SPLITS)}")
    path = Path(data_dir) / f"{split}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"no prepared {split} split at {path}; run the prepare_images stage first")
    content = path.read_bytes()  # read once: loaded, and hashed against the manifest
    try:
        payload = torch.load(io.BytesIO(content), weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or foreign files
        # torch's own message suggests weights_only=False, which would run code from the file: not repeated.
        raise ValueError(
            f"{path} is not a readable prepared {split} split ({type(err).__name__}; truncated, corrupt or "
            f"not written by prepare_images); rerun the prepare_images stage"
        ) from err
    checked = _check_split(payload, path)
    if (Path(data_dir) / "manifest.json").is_file():
        sha256 = hashlib.sha256(content).hexdigest()
        _check_against_manifest(checked, path, split, read_manifest(data_dir), sha256)
    return checked


def _check_against_manifest(
    checked: ImageSplit, path: Path, split: str, manifest: dict[str, Any], sha256: str
) -> None:
    listed = manifest.get("splits", {}).get(split, {})
    if listed.get("sha256") != sha256:
        raise ValueError(
            f"{path} is not the {split} split manifest.json lists (its SHA-256 differs): it was changed "
            "after prepare_images wrote it; rerun the prepare_images stage"
        )
    shape, n_classes = tuple(manifest.get("image_shape", ())), manifest.get("n_classes")
    if tuple(checked.images.shape[1:]) != shape:
        raise ValueError(f"{path} holds images of shape {tuple(checked.images.shape[1:])}, not {shape}")
    if isinstance(n_classes, int) and checked.labels.numel() and int(checked.labels.max()) >= n_classes:
        raise ValueError(
            f"{path} holds label {int(checked.labels.max())}; {manifest.get('dataset')} has {n_classes}"
        )


SPLIT_FIELDS: dict[str, tuple[torch.dtype, int]] = {
    "images": (torch.uint8, 4),
    "labels": (torch.int64, 1),
    "source_indices": (torch.int64, 1),
}


def _check_split(payload: Any, path: Path) -> ImageSplit:
    """The split in ``payload`` if it is what :func:`prepare_image_data` writes; else a ValueError."""
    if not isinstance(payload, dict):
        raise ValueError(f"{path} holds a {type(payload).__name__}, not a prepared split (a dict of tensors)")
    missing = [key for key in SPLIT_FIELDS if key not in payload]
    if missing:
        raise ValueError(f"{path} lacks {missing}; a prepared split holds {list(SPLIT_FIELDS)}")
    for key, (dtype, ndim) in SPLIT_FIELDS.items():
        value = payload[key]
        if not isinstance(value, Tensor) or value.dtype != dtype or value.ndim != ndim:
            got = f"{value.dtype} {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"{path}: {key!r} should be a {ndim}-D {dtype} tensor, got {got}")
    images, labels, indices = (payload[key] for key in SPLIT_FIELDS)
    for key, value in (("labels", labels), ("source_indices", indices)):
        if value.shape[0] != images.shape[0]:
            raise ValueError(f"{path} holds {value.shape[0]} {key} for {images.shape[0]} images")
    negative = (labels < 0).nonzero().flatten()
    if negative.numel():
        row = int(negative[0])
        raise ValueError(f"{path} holds label {int(labels[row])} at row {row}; labels are ≥ 0")
    return ImageSplit(images, labels, indices)


def read_manifest(data_dir: Path) -> dict[str, Any]:
    """The manifest of a prepared dataset folder; a ValueError naming the file if it is not valid JSON."""
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"no manifest at {path}; run the prepare_images stage first")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"), parse_constant=_reject_constant)
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, NaN or Infinity
        raise ValueError(f"{path} is not a readable manifest ({err}); rerun prepare_images") from err
    if not isinstance(manifest, dict):
        raise ValueError(f"{path} holds a JSON {type(manifest).__name__}, not a manifest object")
    return manifest


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a valid value (the manifest holds no NaN or infinite numbers)")
