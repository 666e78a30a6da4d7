"""Labelled sets read from disk: class folders, MNIST-format idx files, CIFAR binary files."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.datasets import list_labelled_images, load_cifar_binary, load_dataset, load_idx_dataset, write_dataset


def write_idx(path: Path, array: np.ndarray) -> None:
    header = b"\0\0\x08" + bytes([array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_files_plain_or_gzipped(tmp_path: Path, rng) -> None:
    images = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2, 9], dtype=np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels)
    got_images, got_labels = load_idx_dataset(tmp_path)
    np.testing.assert_array_equal(got_images, images)
    assert got_labels.tolist() == labels.tolist()
    names = load_dataset(f"fashion-mnist:{tmp_path}")[1]
    assert names[:3] == ["t-shirt", "trouser", "pullover"] and names[-1] == "ankle-boot"
    assert load_dataset(f"mnist:{tmp_path}")[1][0] == "digit_0"
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "train-images-idx3-ubyte").write_bytes(b"PK\x03\x04 a zip file")
    (tmp_path / "bad" / "train-labels-idx1-ubyte").write_bytes(b"PK")
    with pytest.raises(ValueError, match="not an idx file"):
        load_idx_dataset(tmp_path / "bad")
    with pytest.raises(FileNotFoundError, match="idx files"):
        load_idx_dataset(tmp_path / "nowhere")


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_cifar_binary_files(tmp_path: Path, rng, kind: str) -> None:
    n = 4
    pixels = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    if kind == "cifar10":
        labels = np.array([3, 1, 4, 1], dtype=np.uint8)
        records = np.concatenate([labels[:, None], pixels.reshape(n, -1)], axis=1)
        for i in range(1, 6):
            records.tofile(tmp_path / f"data_batch_{i}.bin")
        (tmp_path / "batches.meta.txt").write_text("\n".join(f"c{i}" for i in range(10)) + "\n\n")
        expected_labels = [3, 1, 4, 1] * 5
    else:
        coarse, fine = np.array([0, 1, 2, 3], np.uint8), np.array([10, 20, 30, 99], np.uint8)
        records = np.concatenate([coarse[:, None], fine[:, None], pixels.reshape(n, -1)], axis=1)
        records.tofile(tmp_path / "train.bin")
        (tmp_path / "fine_label_names.txt").write_text("\n".join(f"f{i}" for i in range(100)))
        expected_labels = [10, 20, 30, 99]
    images, labels, names = load_cifar_binary(tmp_path)
    assert labels.tolist() == expected_labels
    np.testing.assert_array_equal(images[0], pixels[0].transpose(1, 2, 0))   # HWC, RGB
    assert load_dataset(f"{kind}:{tmp_path}")[1][0] == names[expected_labels[0]]


def test_named_sets_and_class_folders(tmp_path: Path) -> None:
    paths, labels = write_dataset("mnist5000", tmp_path / "mnist", per_class=3, seed=1)
    assert len(paths) == 30 and sorted(set(labels)) == [f"digit_{i}" for i in range(10)]
    assert Image.open(paths[0]).size == (28, 28)
    assert write_dataset("mnist5000", tmp_path / "mnist", per_class=3, seed=1) == (paths, labels)  # kept
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("cifar10")  # needs :DIR
    (tmp_path / "one" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="two class sub-folders"):
        list_labelled_images(tmp_path / "one")
    with pytest.raises(FileNotFoundError):
        list_labelled_images(tmp_path / "missing")
