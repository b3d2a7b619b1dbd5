"""Image data prep: tiny files in the real formats (IDX, CIFAR-10 pickle batches) read by torchvision.

The writers here produce the original byte layouts, so torchvision's own ``MNIST``, ``FashionMNIST`` and
``CIFAR10`` readers run on them; other image tests import them.
"""

from __future__ import annotations

import gzip
import json
import pickle
import struct
import tarfile
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch

from ebm.data.images import (
    IDX_FILES,
    ImageDataConfig,
    ImageDataUnavailableError,
    load_image_split,
    load_original,
    prepare_image_data,
    read_manifest,
)


def write_idx(path: Path, array: np.ndarray, *, compress: bool) -> Path:
    """An IDX file: magic (0, 0, type 0x08 = ubyte, n dims), big-endian dims, then the raw bytes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def write_mnist_copy(
    folder: Path, *, n_train: int, n_test: int, seed: int = 0, compress: bool = True
) -> dict:
    """A local copy of an MNIST-family dataset; returns the arrays written."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, array in arrays.items():
        write_idx(folder / name, array, compress=compress)
    return arrays


def write_cifar_copy(
    folder: Path,
    *,
    per_batch: int,
    n_test: int,
    seed: int = 0,
    images: np.ndarray | None = None,
    labels: np.ndarray | None = None,
) -> dict:
    """``cifar-10-batches-py/``: five training batches, a test batch and ``batches.meta``, as pickles.

    Each batch is ``{"data": uint8 (N, 3072) rows of R, G, B planes, "labels": list of ints}``. ``images``
    (uint8 ``(N, 3, 32, 32)``, N = 5·per_batch + n_test) and ``labels`` fix the contents; random otherwise.
    """
    rng = np.random.default_rng(seed)
    batches = folder / "cifar-10-batches-py"
    batches.mkdir(parents=True, exist_ok=True)
    total = 5 * per_batch + n_test
    if images is None:
        images = rng.integers(0, 256, (total, 3, 32, 32), dtype=np.uint8)
    labels = (rng.integers(0, 10, total) if labels is None else np.asarray(labels)).tolist()
    rows = images.reshape(total, 3 * 32 * 32)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    starts = [i * per_batch for i in range(5)] + [5 * per_batch]
    sizes = [per_batch] * 5 + [n_test]
    for name, start, size in zip(names, starts, sizes, strict=True):
        entry = {
            "data": rows[start : start + size],
            "labels": labels[start : start + size],
            "batch_label": name,
        }
        (batches / name).write_bytes(pickle.dumps(entry, protocol=2))
    meta = {
        "label_names": [
            "airplane",
            "automobile",
            "bird",
            "cat",
            "deer",
            "dog",
            "frog",
            "horse",
            "ship",
            "truck",
        ]
    }
    (batches / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return {"images": images, "labels": np.array(labels)}


@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "plain"])
def test_idx_local_copy_is_read_by_torchvision_and_split_with_a_record(
    tmp_path: Path, compress: bool
) -> None:
    arrays = write_mnist_copy(tmp_path / "copy", n_train=60, n_test=20, compress=compress)
    config = ImageDataConfig(
        dataset="mnist", local_copy=str(tmp_path / "copy"), download=False, n_validation=10
    )

    manifest = prepare_image_data(config, tmp_path / "out", seed=3)

    train, validation, test = (load_image_split(tmp_path / "out", s) for s in ("train", "validation", "test"))
    assert train.images.dtype == torch.uint8 and train.images.shape == (50, 1, 28, 28)
    assert validation.images.shape == (10, 1, 28, 28) and test.images.shape == (20, 1, 28, 28)
    original_train = torch.from_numpy(arrays["train-images-idx3-ubyte"])
    for split in (train, validation):  # every row is the original row it says it is
        assert torch.equal(split.images[:, 0], original_train[split.source_indices])
        assert torch.equal(
            split.labels, torch.from_numpy(arrays["train-labels-idx1-ubyte"]).long()[split.source_indices]
        )
    assert sorted(torch.cat([train.source_indices, validation.source_indices]).tolist()) == list(range(60))
    assert torch.equal(test.images[:, 0], torch.from_numpy(arrays["t10k-images-idx3-ubyte"]))
    assert manifest == read_manifest(tmp_path / "out")
    assert manifest["source"] == f"local copy {tmp_path / 'copy'}" and manifest["seed"] == 3
    assert manifest["splits"]["validation"]["count"] == 10
    assert set(manifest["source_sha256"]) == set(IDX_FILES)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["splits"]["train"]["sha256"]


def test_splits_are_fixed_by_the_seed_and_change_with_it(tmp_path: Path) -> None:
    write_mnist_copy(tmp_path / "copy", n_train=40, n_test=10)
    config = ImageDataConfig(
        dataset="fashion_mnist", local_copy=str(tmp_path / "copy"), n_validation=8, max_train=20
    )
    indices = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        prepare_image_data(config, tmp_path / name, seed=seed)
        indices[name] = load_image_split(tmp_path / name, "validation").source_indices
    assert torch.equal(indices["a"], indices["b"])
    assert not torch.equal(indices["a"], indices["c"])
    assert load_image_split(tmp_path / "a", "train").images.shape[0] == 20


def test_cifar_pickle_batches_are_read_in_channel_plane_order(tmp_path: Path) -> None:
    written = write_cifar_copy(tmp_path / "copy", per_batch=4, n_test=6)
    config = ImageDataConfig(
        dataset="cifar10", local_copy=str(tmp_path / "copy"), download=False, n_validation=0
    )

    original = load_original(config)

    assert original.train_images.shape == (20, 3, 32, 32) and original.test_images.shape == (6, 3, 32, 32)
    assert torch.equal(original.train_images, torch.from_numpy(written["images"][:20]))
    assert torch.equal(original.test_labels, torch.from_numpy(written["labels"][20:]).long())
    assert original.official_checksums is False  # a fixture is not the official release


def test_cifar_archive_is_extracted_from_the_local_copy(tmp_path: Path) -> None:
    written = write_cifar_copy(tmp_path / "staging", per_batch=2, n_test=3)
    (tmp_path / "copy").mkdir()
    with tarfile.open(tmp_path / "copy" / "cifar-10-python.tar.gz", "w:gz") as archive:
        archive.add(tmp_path / "staging" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    config = ImageDataConfig(dataset="cifar10", local_copy=str(tmp_path / "copy"), download=False)
    assert torch.equal(load_original(config).test_images, torch.from_numpy(written["images"][10:]))


def test_offline_without_a_copy_names_both_ways_out(tmp_path: Path) -> None:
    config = ImageDataConfig(dataset="mnist", local_copy=str(tmp_path / "missing"), download=False)
    with pytest.raises(ImageDataUnavailableError, match=r"local_copy.*download"):
        load_original(config, project_root=tmp_path)


def test_a_failed_download_names_both_ways_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*_args: object, **_kwargs: object) -> None:
        raise URLError("network is unreachable")

    monkeypatch.setattr("torchvision.datasets.mnist.download_and_extract_archive", offline)
    config = ImageDataConfig(dataset="mnist", local_copy=str(tmp_path / "missing"), download=True)
    with pytest.raises(ImageDataUnavailableError, match=r"(?s)download failed.*local_copy.*download: true"):
        load_original(config, project_root=tmp_path)
    assert (tmp_path / "data" / "downloads" / ".gitignore").read_text() == "*\n"


def test_a_local_copy_missing_a_file_says_which(tmp_path: Path) -> None:
    write_mnist_copy(tmp_path / "copy", n_train=5, n_test=5)
    (tmp_path / "copy" / "t10k-labels-idx1-ubyte.gz").unlink()
    config = ImageDataConfig(dataset="mnist", local_copy=str(tmp_path / "copy"), download=False)
    with pytest.raises(ImageDataUnavailableError, match="t10k-labels-idx1-ubyte"):
        load_original(config)


def test_unknown_names_and_missing_splits_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fashion_mnist"):
        ImageDataConfig(dataset="imagenet")
    with pytest.raises(ValueError, match="validation"):
        load_image_split(tmp_path, "dev")
    with pytest.raises(FileNotFoundError, match="prepare_images"):
        load_image_split(tmp_path, "train")


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="dataset-fashion-mnist not installed"
)
def test_the_debian_fashion_mnist_copy_is_the_default_and_needs_no_network(tmp_path: Path) -> None:
    original = load_original(ImageDataConfig(dataset="fashion_mnist", download=False))
    assert original.train_images.shape == (60000, 1, 28, 28) and original.test_images.shape == (
        10000,
        1,
        28,
        28,
    )
    assert original.source == "local copy /usr/share/datasets/fashion-mnist"
    assert torch.bincount(original.test_labels).tolist() == [1000] * 10
