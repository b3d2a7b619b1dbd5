"""Image data prep: tiny files in the real formats (IDX, CIFAR-10 pickle batches) read by torchvision.

The writers here produce the original byte layouts, so torchvision's own ``MNIST``, ``FashionMNIST`` and
``CIFAR10`` readers run on them; other image tests import them.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import pickle
import re
import shutil
import struct
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.error import URLError

import numpy as np
import pytest
import torch
from torchvision import datasets

import ebm.data.images as images_module
from ebm.data.images import (
    IDX_FILES,
    IMAGE_DATASETS,
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
        dataset="fashion_mnist", local_copy=str(tmp_path / "copy"), n_validation=8, max_train=20, max_test=5
    )
    indices = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        prepare_image_data(config, tmp_path / name, seed=seed)
        indices[name] = torch.cat(
            [load_image_split(tmp_path / name, split).source_indices for split in ("validation", "test")]
        )
    assert torch.equal(indices["a"], indices["b"])  # the test subset too: drawn from the seeded generator
    assert not torch.equal(indices["a"][:8], indices["c"][:8]) and not torch.equal(
        indices["a"][8:], indices["c"][8:]
    )
    assert load_image_split(tmp_path / "a", "train").images.shape[0] == 20


def test_cifar_pickle_batches_are_read_in_channel_plane_order(tmp_path: Path) -> None:
    written = write_cifar_copy(tmp_path / "copy", per_batch=4, n_test=6)
    config = ImageDataConfig(
        dataset="cifar10", local_copy=str(tmp_path / "copy"), download=False, n_validation=2
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
    config = ImageDataConfig(dataset="mnist", local_copy=None, download=True)  # mnist has no system copy
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


# --- bad input: each error names the file ----------------------------------------------------------


def _mnist_config(folder: Path) -> ImageDataConfig:
    return ImageDataConfig(dataset="mnist", local_copy=str(folder), download=False, n_validation=2)


@pytest.mark.parametrize(
    ("name", "n_labels"),
    [("train-labels-idx1-ubyte", 14), ("train-labels-idx1-ubyte", 6), ("t10k-labels-idx1-ubyte", 3)],
    ids=["train-more", "train-fewer", "test-fewer"],
)
def test_an_idx_label_file_of_another_length_than_its_images_is_named(
    tmp_path: Path, name: str, n_labels: int
) -> None:
    write_mnist_copy(tmp_path / "copy", n_train=10, n_test=5)
    bad = write_idx(tmp_path / "copy" / name, np.arange(n_labels) % 10, compress=True)
    with pytest.raises(ImageDataUnavailableError, match=rf"{re.escape(str(bad))} holds {n_labels} labels"):
        prepare_image_data(_mnist_config(tmp_path / "copy"), tmp_path / "out", seed=0)
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_an_idx_label_outside_the_classes_is_named_with_its_row(tmp_path: Path) -> None:
    write_mnist_copy(tmp_path / "copy", n_train=10, n_test=5)
    labels = np.arange(10) % 10
    labels[7] = 200
    bad = write_idx(tmp_path / "copy" / "train-labels-idx1-ubyte", labels, compress=True)
    with pytest.raises(ImageDataUnavailableError, match=rf"{re.escape(str(bad))} holds label 200 at row 7"):
        load_original(_mnist_config(tmp_path / "copy"))


def test_idx_test_images_of_another_shape_than_the_spec_are_named(tmp_path: Path) -> None:
    write_mnist_copy(tmp_path / "copy", n_train=10, n_test=5)
    big = np.zeros((5, 32, 32), dtype=np.uint8)
    bad = write_idx(tmp_path / "copy" / "t10k-images-idx3-ubyte", big, compress=True)
    with pytest.raises(ImageDataUnavailableError, match=rf"{re.escape(str(bad))} holds images of shape"):
        load_original(_mnist_config(tmp_path / "copy"))


@pytest.mark.parametrize(
    ("name", "keep"),
    [("train-images-idx3-ubyte", 1000), ("t10k-labels-idx1-ubyte", 3)],
    ids=["short-data", "short-header"],
)
def test_a_truncated_idx_file_is_named(tmp_path: Path, name: str, keep: int) -> None:
    write_mnist_copy(tmp_path / "copy", n_train=10, n_test=5, compress=False)
    path = tmp_path / "copy" / name
    path.write_bytes(path.read_bytes()[:keep])
    with pytest.raises(ImageDataUnavailableError, match=rf"{re.escape(str(path))} is not a readable IDX"):
        load_original(_mnist_config(tmp_path / "copy"))


def _rewrite_batch(folder: Path, name: str, **changes: object) -> Path:
    """Replace entries of one pickled CIFAR-10 batch in a copy :func:`write_cifar_copy` wrote."""
    path = folder / "cifar-10-batches-py" / name
    entry = pickle.loads(path.read_bytes())
    path.write_bytes(pickle.dumps({**entry, **changes}, protocol=2))
    return path


def _cifar_config(folder: Path) -> ImageDataConfig:
    return ImageDataConfig(dataset="cifar10", local_copy=str(folder), download=False, n_validation=2)


@pytest.mark.parametrize(
    ("name", "labels", "message"),
    [
        ("data_batch_2", [1] * 8, "holds 8 labels for 6 images"),
        ("data_batch_4", [1] * 5, "holds 5 labels for 6 images"),
        ("test_batch", [0, 1, 99, 3, 4, 5], "holds label 99 at row 2"),
        ("data_batch_1", [0, 1, 2, -1, 4, 5], "holds label -1 at row 3"),
    ],
    ids=["more-labels", "fewer-labels", "label-99", "label-negative"],
)
def test_a_cifar_batch_whose_labels_do_not_fit_its_images_is_named(
    tmp_path: Path, name: str, labels: list[int], message: str
) -> None:
    write_cifar_copy(tmp_path / "copy", per_batch=6, n_test=6)
    bad = _rewrite_batch(tmp_path / "copy", name, labels=labels)
    with pytest.raises(ImageDataUnavailableError, match=rf"{re.escape(str(bad))} {message}"):
        prepare_image_data(_cifar_config(tmp_path / "copy"), tmp_path / "out", seed=0)
    assert not (tmp_path / "out").exists()


def test_mismatches_that_cancel_out_across_cifar_batches_are_still_caught(tmp_path: Path) -> None:
    # 8 + 4 labels for 6 + 6 images: the totals agree, but torchvision's concatenation would mis-pair them.
    write_cifar_copy(tmp_path / "copy", per_batch=6, n_test=6)
    bad = _rewrite_batch(tmp_path / "copy", "data_batch_2", labels=[1] * 8)
    _rewrite_batch(tmp_path / "copy", "data_batch_3", labels=[1] * 4)
    with pytest.raises(ImageDataUnavailableError, match=rf"{re.escape(str(bad))} holds 8 labels"):
        load_original(_cifar_config(tmp_path / "copy"))


def test_a_cifar_batch_of_another_row_width_is_named(tmp_path: Path) -> None:
    write_cifar_copy(tmp_path / "copy", per_batch=3, n_test=3)
    bad = _rewrite_batch(tmp_path / "copy", "data_batch_5", data=np.zeros((3, 3200), dtype=np.uint8))
    with pytest.raises(ImageDataUnavailableError, match=rf"{re.escape(str(bad))}: 'data' should be uint8"):
        load_original(_cifar_config(tmp_path / "copy"))


class _TouchesAFile:
    """Unpickled, it calls Path.touch: what a malicious batch would do with os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


def test_a_cifar_pickle_that_calls_code_is_refused_before_the_code_runs(tmp_path: Path) -> None:
    # before: the check unpickled it with pickle.load, ran the call, and only then refused the copy
    write_cifar_copy(tmp_path / "copy", per_batch=2, n_test=2)
    marker = tmp_path / "ran"
    batch = tmp_path / "copy" / "cifar-10-batches-py" / "data_batch_1"
    batch.write_bytes(pickle.dumps({"data": _TouchesAFile(marker), "labels": [0, 1]}, protocol=2))
    with pytest.raises(ImageDataUnavailableError, match=r"data_batch_1 is not a readable.*refused to load"):
        load_original(_cifar_config(tmp_path / "copy"))
    assert not marker.exists()


@pytest.mark.parametrize("name", ["data_batch_3", "test_batch", "batches.meta"])
def test_a_missing_cifar_file_is_named(tmp_path: Path, name: str) -> None:
    write_cifar_copy(tmp_path / "copy", per_batch=2, n_test=2)
    missing = tmp_path / "copy" / "cifar-10-batches-py" / name
    missing.unlink()
    with pytest.raises(ImageDataUnavailableError, match=rf"lacks {re.escape(str(missing))}"):
        load_original(_cifar_config(tmp_path / "copy"))


def test_a_cifar_archive_missing_a_batch_names_the_archive_and_the_member(tmp_path: Path) -> None:
    write_cifar_copy(tmp_path / "staging", per_batch=2, n_test=2)
    (tmp_path / "staging" / "cifar-10-batches-py" / "data_batch_3").unlink()
    (tmp_path / "copy").mkdir()
    archive = tmp_path / "copy" / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "staging" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    with pytest.raises(
        ImageDataUnavailableError, match=rf"{re.escape(str(archive))} \(member .*data_batch_3\)"
    ):
        load_original(_cifar_config(tmp_path / "copy"))


@pytest.mark.parametrize(
    "content", [b"not a pickle", b"", pickle.dumps([1, 2, 3])], ids=["garbage", "empty", "list"]
)
def test_an_unreadable_cifar_batch_is_named(tmp_path: Path, content: bytes) -> None:
    write_cifar_copy(tmp_path / "copy", per_batch=2, n_test=2)
    bad = tmp_path / "copy" / "cifar-10-batches-py" / "data_batch_2"
    bad.write_bytes(content)
    with pytest.raises(
        ImageDataUnavailableError, match=rf"{re.escape(str(bad))} is not a (readable )?CIFAR-10"
    ):
        load_original(_cifar_config(tmp_path / "copy"))


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_a_named_local_copy_that_is_not_a_folder_is_an_error_not_a_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    attempts: list[object] = []

    def offline(*args: object, **_kwargs: object) -> None:
        attempts.append(args)
        raise URLError("network is unreachable")

    monkeypatch.setattr("torchvision.datasets.mnist.download_and_extract_archive", offline)
    local = tmp_path / "mnist.tar.gz"
    if kind == "file":
        local.write_bytes(b"an archive, not a folder")
    state = "is a file, not a folder" if kind == "file" else "does not exist"
    config = ImageDataConfig(dataset="fashion_mnist", local_copy=str(local), download=True)
    with pytest.raises(ImageDataUnavailableError, match=rf"{re.escape(str(local))} .*{state}"):
        load_original(config, project_root=tmp_path)
    assert attempts == []  # the mistyped folder is reported, not replaced by a download

    # The system copy, left as the default or named (params.yaml names Debian's), still falls back quietly.
    spec = IMAGE_DATASETS["fashion_mnist"]
    monkeypatch.setitem(IMAGE_DATASETS, "fashion_mnist", replace(spec, system_copy=str(tmp_path / "absent")))
    for named in (None, str(tmp_path / "absent")):
        config = ImageDataConfig(dataset="fashion_mnist", local_copy=named, download=True)
        with pytest.raises(ImageDataUnavailableError, match="download failed"):
            load_original(config, project_root=tmp_path)
    assert attempts  # the download was tried


def _write_split(folder: Path, name: str, payload: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(payload, folder / f"{name}.pt")
    return folder / f"{name}.pt"


def _good_split(n: int = 3) -> dict[str, torch.Tensor]:
    return {
        "images": torch.zeros(n, 1, 28, 28, dtype=torch.uint8),
        "labels": torch.zeros(n, dtype=torch.int64),
        "source_indices": torch.arange(n),
    }


def test_a_corrupt_prepared_split_is_named_without_the_unsafe_advice(tmp_path: Path) -> None:
    (tmp_path / "train.pt").write_bytes(b"\x00" * 100)
    with pytest.raises(
        ValueError, match=rf"{re.escape(str(tmp_path / 'train.pt'))} is not a readable"
    ) as info:
        load_image_split(tmp_path, "train")
    assert "weights_only" not in str(info.value)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"labels": None}, r"lacks \['labels'\]"),
        (
            {"images": torch.zeros(3, 1, 28, 28)},
            r"'images' should be a 4-D torch.uint8 tensor, got torch.float32",
        ),
        ({"labels": torch.zeros(3, dtype=torch.int32)}, r"'labels' should be a 1-D torch.int64"),
        ({"labels": torch.zeros(5, dtype=torch.int64)}, r"holds 5 labels for 3 images"),
        ({"source_indices": torch.arange(2)}, r"holds 2 source_indices for 3 images"),
        ({"labels": torch.tensor([0, -4, 1])}, r"holds label -4 at row 1"),
    ],
    ids=["no-labels", "float-images", "int32-labels", "5-labels", "2-indices", "negative-label"],
)
def test_a_prepared_split_unlike_what_prepare_writes_is_named(
    tmp_path: Path, change: dict[str, object], message: str
) -> None:
    _write_split(tmp_path / "good", "validation", _good_split())  # what prepare_image_data writes loads
    assert load_image_split(tmp_path / "good", "validation").images.shape == (3, 1, 28, 28)
    payload = {key: value for key, value in {**_good_split(), **change}.items() if value is not None}
    path = _write_split(tmp_path, "validation", payload)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}:? {message}"):
        load_image_split(tmp_path, "validation")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"labels": torch.full((50,), 99)}, "SHA-256 differs"),  # any edit after prepare wrote the file
        (None, "holds label 99; mnist has 10"),  # the same edit, its hash written into the manifest too
    ],
    ids=["edited", "edited-and-rehashed"],
)
def test_a_prepared_split_edited_after_prepare_is_named(
    tmp_path: Path, change: dict[str, torch.Tensor] | None, message: str
) -> None:
    # before: labels ≥ the class count, images of another shape or an edited file loaded without a word
    write_mnist_copy(tmp_path / "copy", n_train=60, n_test=20)
    config = ImageDataConfig(
        dataset="mnist", local_copy=str(tmp_path / "copy"), download=False, n_validation=10
    )
    out = tmp_path / "out"
    prepare_image_data(config, out, seed=3)
    payload = torch.load(out / "train.pt", weights_only=True)
    torch.save({**payload, "labels": torch.full((50,), 99)}, out / "train.pt")
    if change is None:
        manifest = json.loads((out / "manifest.json").read_text())
        manifest["splits"]["train"]["sha256"] = hashlib.sha256((out / "train.pt").read_bytes()).hexdigest()
        (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=rf"{re.escape(str(out / 'train.pt'))}.*{message}"):
        load_image_split(out, "train")
    assert load_image_split(out, "test").images.shape == (20, 1, 28, 28)  # the untouched split still loads


@pytest.mark.parametrize(
    "text", ['{"dataset": "mnist",', '["a list"]', '{"seed": NaN}'], ids=["truncated", "list", "nan"]
)
def test_a_broken_manifest_is_named(tmp_path: Path, text: str) -> None:
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "manifest.json"))):
        read_manifest(tmp_path)


# --- torchvision's download folder: files already there are read and checked, never trusted ----------


def _offline_downloads(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Make torchvision's MNIST download fail as offline, recording each attempt."""
    attempts: list[object] = []

    def offline(*args: object, **_kwargs: object) -> None:
        attempts.append(args)
        raise URLError("network is unreachable")

    monkeypatch.setattr("torchvision.datasets.mnist.download_and_extract_archive", offline)
    return attempts


def _publish_md5s(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """Make the ``.gz`` files in ``folder`` the ones torchvision's MNIST ``resources`` publish sums of."""
    resources = [
        (f"{name}.gz", hashlib.md5((folder / f"{name}.gz").read_bytes()).hexdigest()) for name in IDX_FILES
    ]
    monkeypatch.setattr(datasets.MNIST, "resources", resources)


def _download_config() -> ImageDataConfig:
    return ImageDataConfig(dataset="mnist", local_copy=None, download=True, n_validation=2)  # no system copy


@pytest.mark.parametrize("case", ["plain-only", "gz-official", "plain-differs-from-gz", "gz-not-official"])
def test_idx_files_already_in_the_download_folder_are_read_and_checked_not_trusted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    attempts = _offline_downloads(monkeypatch)
    raw = tmp_path / "data" / "downloads" / "MNIST" / "raw"
    arrays = write_mnist_copy(raw, n_train=10, n_test=5, compress=False)
    if case != "plain-only":  # torchvision keeps each .gz it downloaded beside the file it unpacked
        write_mnist_copy(raw, n_train=10, n_test=5, compress=True)
    if case in ("gz-official", "plain-differs-from-gz"):
        _publish_md5s(monkeypatch, raw)
    if case == "plain-differs-from-gz":
        arrays = write_mnist_copy(raw, n_train=10, n_test=5, seed=1, compress=False)

    original = load_original(_download_config(), project_root=tmp_path)

    assert original.official_checksums is (case == "gz-official")
    assert attempts == []  # nothing was downloaded: the files were there
    assert original.source == "download folder data/downloads (files already there, not downloaded now)"
    assert torch.equal(original.train_images[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"]))


def test_a_download_is_recorded_as_one_and_the_files_it_left_as_already_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mirror = tmp_path / "mirror"  # what the network would serve
    arrays = write_mnist_copy(mirror, n_train=10, n_test=5, compress=True)
    _publish_md5s(monkeypatch, mirror)
    fetched: list[str] = []

    def download_and_extract(url: str, download_root: str, filename: str, md5: str) -> None:
        # torchvision's download_and_extract_archive, from the mirror folder: check the MD5, keep the .gz
        assert hashlib.md5((mirror / filename).read_bytes()).hexdigest() == md5
        fetched.append(filename)
        shutil.copy(mirror / filename, Path(download_root) / filename)
        with gzip.open(mirror / filename) as source:
            (Path(download_root) / filename.removesuffix(".gz")).write_bytes(source.read())

    monkeypatch.setattr("torchvision.datasets.mnist.download_and_extract_archive", download_and_extract)

    first = load_original(_download_config(), project_root=tmp_path)
    again = load_original(_download_config(), project_root=tmp_path)

    assert fetched == [f"{name}.gz" for name in IDX_FILES]  # downloaded once
    assert (first.source, first.official_checksums) == ("torchvision download", True)
    assert again.source.startswith("download folder data/downloads") and again.official_checksums is True
    assert torch.equal(again.test_labels, torch.from_numpy(arrays["t10k-labels-idx1-ubyte"]).long())


def _bad_magic(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[3] = 7  # seven dimensions: torchvision asserts
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _seven_labels(path: Path) -> None:
    write_idx(path, np.arange(7) % 10, compress=False)


@pytest.mark.parametrize(
    ("name", "spoil", "message"),
    [
        ("t10k-labels-idx1-ubyte", _bad_magic, "is not a readable IDX file"),
        ("train-images-idx3-ubyte", _truncate, "is not a readable IDX file"),
        ("train-labels-idx1-ubyte", _seven_labels, "holds 7 labels for 10 images"),
    ],
    ids=["bad-magic", "truncated", "label-count"],
)
def test_a_corrupt_file_in_the_download_folder_is_named_not_blamed_on_the_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, spoil: Callable[[Path], None], message: str
) -> None:
    attempts = _offline_downloads(monkeypatch)
    raw = tmp_path / "data" / "downloads" / "MNIST" / "raw"
    write_mnist_copy(raw, n_train=10, n_test=5, compress=False)
    spoil(raw / name)
    with pytest.raises(
        ImageDataUnavailableError,
        match=rf"{re.escape(str(raw / name))} {message}.*delete the file named and rerun",
    ) as info:
        load_original(_download_config(), project_root=tmp_path)
    assert "download failed" not in str(info.value) and attempts == []


# --- a CIFAR-10 archive may not write outside the folder it is unpacked into ----------------------------


def _cifar_archive(path: Path, staging: Path, extra: tarfile.TarInfo | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        tar.add(staging / "cifar-10-batches-py", arcname="cifar-10-batches-py")
        if extra is not None:
            tar.addfile(extra, io.BytesIO(b"x" * extra.size) if extra.isfile() else None)
    return path


@pytest.mark.parametrize("mode", ["data-filter", "by-hand"])  # by hand: Python < 3.11.4 has no filter
@pytest.mark.parametrize("kind", ["dotdot", "symlink-out", "symlink-as-batch", "too-large"])
def test_a_cifar_archive_unpacks_only_its_seven_files_and_refuses_a_bad_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, kind: str
) -> None:
    temp = tmp_path / "tmp"  # the temporary folder the archive is unpacked into lies in here
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    if mode == "by-hand":
        monkeypatch.delattr(tarfile, "data_filter")
    written = write_cifar_copy(tmp_path / "staging", per_batch=2, n_test=2)
    good = _cifar_archive(tmp_path / "good" / "cifar-10-python.tar.gz", tmp_path / "staging")
    assert torch.equal(
        load_original(_cifar_config(good.parent)).test_images, torch.from_numpy(written["images"][10:])
    )

    member: tarfile.TarInfo | None = None
    if kind == "dotdot":
        member = tarfile.TarInfo("../escaped.txt")  # from <temp>/ebm-images-*/ to <temp>/escaped.txt
        member.size = 5
    elif kind == "symlink-out":
        member = tarfile.TarInfo("cifar-10-batches-py/escape")
        member.type, member.linkname = tarfile.SYMTYPE, "../../escaped.txt"
    elif kind == "symlink-as-batch":
        member = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        member.type, member.linkname = tarfile.SYMTYPE, "../../escaped.txt"
    else:  # before: every member was unpacked whatever its size; a 400 MiB pad filled the temp folder
        monkeypatch.setattr(images_module, "MAX_CIFAR_MEMBER_BYTES", 1000)
    bad = _cifar_archive(tmp_path / "bad" / "cifar-10-python.tar.gz", tmp_path / "staging", member)
    if kind in ("dotdot", "symlink-out"):  # not one of CIFAR-10's files: left in the archive
        assert torch.equal(
            load_original(_cifar_config(bad.parent)).test_images, torch.from_numpy(written["images"][10:])
        )
    else:
        refused = "cifar-10-batches-py/data_batch_1" if kind == "symlink-as-batch" else "cifar-10-batches-py/"
        with pytest.raises(
            ImageDataUnavailableError, match=rf"{re.escape(str(bad))} holds member '{refused}"
        ):
            load_original(_cifar_config(bad.parent))
    assert list(temp.iterdir()) == []  # nothing outside the (removed) extraction folder


# --- a relative local copy lies under the project root, as the download folder does ------------------


def test_a_relative_local_copy_lies_under_the_project_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "project"
    arrays = write_mnist_copy(project / "raw" / "mnist", n_train=10, n_test=5)
    write_mnist_copy(tmp_path / "raw" / "mnist", n_train=10, n_test=5, seed=1)  # a decoy in the cwd
    monkeypatch.chdir(tmp_path)  # the stages' --root need not be the current folder
    config = ImageDataConfig(dataset="mnist", local_copy="raw/mnist", download=False, n_validation=2)

    original = load_original(config, project_root=project)

    assert torch.equal(original.train_images[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte"]))
    assert original.source == "local copy raw/mnist"

    (project / "raw" / "not-a-folder").write_bytes(b"")
    for name, state in (("raw/missing", "does not exist"), ("raw/not-a-folder", "is a file, not a folder")):
        missing = replace(config, local_copy=name)
        with pytest.raises(
            ImageDataUnavailableError, match=rf"{re.escape(str(project / name))} of mnist .*{state}"
        ):
            load_original(missing, project_root=project)

    # The system copy named relative to the project root still falls back quietly to the download.
    attempts = _offline_downloads(monkeypatch)
    spec = IMAGE_DATASETS["fashion_mnist"]
    monkeypatch.setitem(IMAGE_DATASETS, "fashion_mnist", replace(spec, system_copy=str(project / "absent")))
    system = ImageDataConfig(dataset="fashion_mnist", local_copy="absent", download=True)
    with pytest.raises(ImageDataUnavailableError, match="download failed"):
        load_original(system, project_root=project)
    assert attempts


@pytest.mark.parametrize("matching", [4, 3])
def test_a_local_copy_is_the_official_release_only_when_every_gz_file_has_torchvision_s_md5(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, matching: int
) -> None:
    """Debian's re-compressed files match none (not checkable: null), a copy of the official .gz files
    all four; three of four is a copy of something else."""
    write_mnist_copy(tmp_path / "copy", n_train=30, n_test=10)
    md5 = {
        f"{name}.gz": hashlib.md5((tmp_path / "copy" / f"{name}.gz").read_bytes()).hexdigest()
        for name in IDX_FILES
    }
    published = [(name, digest if i < matching else "0" * 32) for i, (name, digest) in enumerate(md5.items())]
    monkeypatch.setattr(datasets.MNIST, "resources", published)
    config = ImageDataConfig(
        dataset="mnist", local_copy=str(tmp_path / "copy"), download=False, n_validation=5
    )
    manifest = prepare_image_data(config, tmp_path / "out", seed=0)
    assert manifest["official_checksums"] is (True if matching == 4 else None)


def test_a_split_of_another_image_shape_than_its_manifest_says_is_named(tmp_path: Path) -> None:
    write_mnist_copy(tmp_path / "copy", n_train=30, n_test=10)
    config = ImageDataConfig(
        dataset="mnist", local_copy=str(tmp_path / "copy"), download=False, n_validation=5
    )
    out = tmp_path / "out"
    prepare_image_data(config, out, seed=0)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["image_shape"] = [3, 32, 32]  # the split's bytes and hash untouched
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"train\.pt.*\(3, 32, 32\)"):
        load_image_split(out, "train")
