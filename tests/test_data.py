"""normzoo.data: the embedded digits set, torchvision's on-disk formats (tiny fake files in the real
layouts, loaded through the real code), batch orders (i.i.d. and class-grouped)."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from normzoo.config import DataConf, InvalidCombination
from normzoo.data import (
    DataBundle,
    DataNotFoundError,
    batches_per_epoch,
    check_available,
    epoch_order,
    load_data,
    stratified_split,
)


def data_cfg(**kw):
    return OmegaConf.merge(OmegaConf.structured(DataConf), kw)


@pytest.fixture(scope="module")
def digits() -> DataBundle:
    return load_data(data_cfg())


def test_digits_shapes_split_and_standardisation(digits: DataBundle) -> None:
    assert digits.input_shape == (1, 8, 8) and digits.num_classes == 10
    assert len(digits.train_y) + len(digits.test_y) == 1797
    assert len(digits.test_y) == round(0.2 * 1797)
    assert digits.train_x.dtype == torch.float32 and digits.train_y.dtype == torch.int64
    # standardised with the training set's statistics
    assert abs(float(digits.train_x.mean())) < 1e-5
    assert float(digits.train_x.std()) == pytest.approx(1.0, abs=1e-3)
    assert abs(float(digits.test_x.mean())) < 0.05
    # stratified: every class keeps its share in both halves
    train_share = torch.bincount(digits.train_y, minlength=10) / len(digits.train_y)
    test_share = torch.bincount(digits.test_y, minlength=10) / len(digits.test_y)
    assert float((train_share - test_share).abs().max()) < 0.01


def test_digits_split_is_seeded(digits: DataBundle) -> None:
    again = load_data(data_cfg())
    assert torch.equal(again.train_x, digits.train_x) and torch.equal(again.test_y, digits.test_y)
    other = load_data(data_cfg(split_seed=1))
    assert not torch.equal(other.train_x, digits.train_x)


def test_subsets(digits: DataBundle) -> None:
    small = load_data(data_cfg(train_subset=100, test_subset=50))
    assert len(small.train_y) == 100 and len(small.test_y) == 50


def write_idx(path: Path, array: np.ndarray) -> None:
    magic = 0x0803 if array.ndim == 3 else 0x0801  # ubyte images (3 dims) / labels (1 dim)
    with open(path, "wb") as f:
        f.write(struct.pack(">i", magic))
        for n in array.shape:
            f.write(struct.pack(">i", n))
        f.write(array.astype(np.uint8).tobytes())


@pytest.mark.parametrize(
    ("name", "folder"), [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")]
)
def test_fake_mnist_root_loads(tmp_path: Path, name: str, folder: str) -> None:
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    train_x, test_x = rng.integers(0, 256, (30, 28, 28)), rng.integers(0, 256, (12, 28, 28))
    train_y, test_y = np.arange(30) % 10, np.arange(12) % 10
    write_idx(raw / "train-images-idx3-ubyte", train_x)
    write_idx(raw / "train-labels-idx1-ubyte", train_y)
    write_idx(raw / "t10k-images-idx3-ubyte", test_x)
    write_idx(raw / "t10k-labels-idx1-ubyte", test_y)
    data = load_data(data_cfg(name=name, root=str(tmp_path)))
    assert data.input_shape == (1, 28, 28) and data.num_classes == 10
    assert data.train_x.shape == (30, 1, 28, 28) and data.test_x.shape == (12, 1, 28, 28)
    assert data.train_y.tolist() == train_y.tolist() and data.test_y.tolist() == test_y.tolist()
    # pixel order kept: standardisation is one affine map of the raw bytes
    raw_train = torch.from_numpy(train_x.astype(np.float32)).flatten()
    corr = torch.corrcoef(torch.stack([raw_train, data.train_x.flatten()]))[0, 1]
    assert float(corr) > 0.9999
    assert abs(float(data.train_x.mean())) < 1e-4


def test_fake_cifar_root_loads(tmp_path: Path) -> None:
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    labels = {}
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        x = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, 4)]
        labels[name] = y
        with open(root / name, "wb") as f:
            pickle.dump({"data": x, "labels": y, "batch_label": name}, f)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)], "num_cases_per_batch": 4}, f)
    data = load_data(data_cfg(name="cifar10", root=str(tmp_path)))
    assert data.input_shape == (3, 32, 32)
    assert data.train_x.shape == (20, 3, 32, 32) and data.test_x.shape == (4, 3, 32, 32)
    train_labels = [y for i in range(1, 6) for y in labels[f"data_batch_{i}"]]
    assert data.train_y.tolist() == train_labels and data.test_y.tolist() == labels["test_batch"]
    # per-channel standardisation
    assert torch.allclose(data.train_x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)


@pytest.mark.parametrize(
    ("name", "where"), [("mnist", "MNIST/raw"), ("cifar10", "cifar-10-batches-py")]
)
def test_missing_data_is_a_clear_error(tmp_path: Path, name: str, where: str) -> None:
    cfg = data_cfg(name=name, root=str(tmp_path / "nowhere"))
    with pytest.raises(DataNotFoundError) as err:
        check_available(cfg)
    text = str(err.value)
    assert "data.download=true" in text and where in text and "data.root" in text
    with pytest.raises(DataNotFoundError):
        load_data(cfg)


def test_iid_order_is_a_seeded_permutation_without_the_last_partial_batch(
    digits: DataBundle,
) -> None:
    n = len(digits.train_y)
    order = epoch_order(digits, 32, torch.Generator().manual_seed(0))
    assert batches_per_epoch(digits, 32) == n // 32 and len(order) == n // 32 * 32
    assert len(set(order.tolist())) == len(order)
    assert torch.equal(order, epoch_order(digits, 32, torch.Generator().manual_seed(0)))
    assert not torch.equal(order, epoch_order(digits, 32, torch.Generator().manual_seed(1)))


@pytest.mark.parametrize(("batch", "k"), [(2, 2), (32, 16 // 2), (20, 10), (4, 1)])
def test_class_grouped_batches_hold_k_classes(digits: DataBundle, batch: int, k: int) -> None:
    steps = batches_per_epoch(digits, batch, k)
    order = epoch_order(digits, batch, torch.Generator().manual_seed(0), k)
    assert len(order) == steps * batch and len(set(order.tolist())) == len(order)
    labels = digits.train_y[order].view(steps, batch)
    for row in labels:
        counts = torch.bincount(row, minlength=10)
        assert int((counts > 0).sum()) == k
        assert set(counts[counts > 0].tolist()) == {batch // k}
    # nearly every sample is used once (only the remainders of the per-class chunks are left out)
    assert steps * batch >= len(digits.train_y) - 10 * batch


def test_class_grouping_that_cannot_apply_is_invalid(digits: DataBundle) -> None:
    g = torch.Generator().manual_seed(0)
    with pytest.raises(InvalidCombination, match="multiple"):
        epoch_order(digits, 6, g, 4)
    with pytest.raises(InvalidCombination, match="classes"):
        batches_per_epoch(digits, 24, 12)


def test_stratified_split_shares_every_class_and_is_seeded() -> None:
    labels = np.repeat(np.arange(3), [50, 30, 7])
    train, test = stratified_split(labels, 0.2, seed=0)
    assert len(test) == round(87 * 0.2) and len(train) + len(test) == 87
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(87))
    assert np.bincount(labels[test]).tolist() == [10, 6, 1]
    again = stratified_split(labels, 0.2, seed=0)
    assert np.array_equal(again[1], test)
    assert not np.array_equal(stratified_split(labels, 0.2, seed=1)[1], test)


@pytest.mark.parametrize(
    ("name", "cls"), [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST"), ("cifar10", "CIFAR10")]
)
@pytest.mark.parametrize("error", ["url", "runtime"])
def test_a_failed_download_is_a_one_line_error(tmp_path, monkeypatch, capsys, name, cls, error):
    """With no internet, data.download=true printed ~30 lines of torchvision traceback."""
    import urllib.error

    import torchvision

    def offline(root, *args, **kwargs):
        print(f"Downloading http://example.invalid/{name} to {root}")  # as torchvision does
        if error == "url":
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried http://a, got:\nx")

    monkeypatch.setattr(torchvision.datasets, cls, offline)
    with pytest.raises(DataNotFoundError) as err:
        load_data(data_cfg(name=name, root=str(tmp_path), download=True))
    text = str(err.value)
    assert "\n" not in text and f"data={name}: data.download=true but the download failed" in text
    assert "Check the internet connection" in text
    assert ("URLError" if error == "url" else "RuntimeError: Error downloading") in text
    assert capsys.readouterr().out == ""  # torchvision's lines went to the log
