"""normzoo.data: the embedded digits set and the generated digits_hard, the validation split,
torchvision's on-disk formats (tiny fake files in the real layouts, loaded through the real code),
batch orders (i.i.d. and class-grouped)."""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import Tensor

from normzoo.config import DataConf, InvalidCombination
from normzoo.data import (
    HARD_COPIES,
    DataBundle,
    DataNotFoundError,
    batches_per_epoch,
    check_available,
    epoch_order,
    generate_hard_digits,
    load_data,
    stratified_split,
)
from normzoo.digits_hard import HARD_NOISE


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


def test_no_validation_split_by_default(digits: DataBundle) -> None:
    assert digits.val_x.shape == (0, 1, 8, 8) and digits.val_y.shape == (0,)


@pytest.fixture(scope="module")
def digits_val() -> DataBundle:
    return load_data(data_cfg(), val_fraction=0.2)


def test_validation_leaves_the_test_split_as_it_was(digits: DataBundle, digits_val) -> None:
    # the test part is exactly the one without a validation split (old results compare)
    assert torch.equal(digits_val.test_y, digits.test_y)
    assert len(digits_val.train_y) + len(digits_val.val_y) == len(digits.train_y)
    assert len(digits_val.val_y) == round(0.2 * len(digits.train_y))


def rows(x: Tensor) -> set[bytes]:
    return {r.numpy().tobytes() for r in x.flatten(1)}


def test_validation_is_disjoint_covers_and_is_stratified(digits: DataBundle, digits_val) -> None:
    # one affine standardisation for all three parts, so equal images stay equal rows
    sets = [rows(p) for p in (digits_val.train_x, digits_val.val_x, digits_val.test_x)]
    assert sum(len(r) for r in sets) == len(set().union(*sets)) == 1797  # disjoint, covering
    # stratified: each class's validation count within 1 of its share of the training part
    pool = torch.bincount(torch.cat([digits_val.train_y, digits_val.val_y]), minlength=10)
    held = torch.bincount(digits_val.val_y, minlength=10)
    assert float((held - 0.2 * pool).abs().max()) < 1.0


def test_validation_is_standardised_with_the_training_part_only(digits_val) -> None:
    assert abs(float(digits_val.train_x.mean())) < 1e-5
    assert float(digits_val.train_x.std()) == pytest.approx(1.0, abs=1e-3)
    assert abs(float(digits_val.val_x.mean())) > 1e-4  # not standardised on itself


def test_validation_split_is_seeded_and_read_from_the_config(digits_val) -> None:
    cfg = data_cfg()
    OmegaConf.set_struct(cfg, False)
    cfg.val_fraction = 0.2  # the key the schema gains; load_data reads it when present
    again = load_data(cfg)
    assert torch.equal(again.val_x, digits_val.val_x) and torch.equal(again.val_y, digits_val.val_y)
    other = load_data(data_cfg(split_seed=1), val_fraction=0.2)
    assert not torch.equal(other.val_y, digits_val.val_y)
    with pytest.raises(ValueError, match="val_fraction"):
        load_data(data_cfg(), val_fraction=1.0)


def test_hard_digits_are_seeded_views_of_each_image() -> None:
    images = np.zeros((5, 1, 8, 8), dtype=np.float32)
    images[2] = 1.0  # one bright image among blank ones
    views = generate_hard_digits(images, copies=3, seed=0)
    assert views.shape == (15, 1, 16, 16) and views.dtype == np.float32
    assert np.array_equal(views, generate_hard_digits(images, copies=3, seed=0))
    assert not np.allclose(views, generate_hard_digits(images, copies=3, seed=1))
    # sample i * copies + j is a view of image i: only views 6, 7, 8 are bright
    brightness = views.reshape(15, -1).mean(1)
    assert sorted(np.argsort(-brightness)[:3].tolist()) == [6, 7, 8]
    assert brightness[6:9].min() > 0.4 and np.abs(np.delete(brightness, [6, 7, 8])).max() < 0.05
    # the views differ (random rotation / zoom / shift / noise), the blanks are pure pixel noise
    assert not np.allclose(views[6], views[7])
    assert float(views[:6].std()) == pytest.approx(HARD_NOISE, rel=0.05)


def test_digits_hard_has_the_stated_sizes_and_splits_by_source_image(digits) -> None:
    hard = load_data(data_cfg(name="digits_hard"), val_fraction=0.2)
    assert hard.input_shape == (1, 16, 16) and hard.num_classes == 10
    assert len(hard.test_y) == HARD_COPIES * len(digits.test_y)  # digits' test images' copies
    assert (len(hard.train_y), len(hard.val_y), len(hard.test_y)) == (6900, 1728, 2154)
    assert sum(len(p) for p in (hard.train_y, hard.val_y, hard.test_y)) == 1797 * HARD_COPIES
    # the test labels are digits' test labels, each repeated once per copy
    assert torch.equal(torch.bincount(hard.test_y), HARD_COPIES * torch.bincount(digits.test_y))
    assert abs(float(hard.train_x.mean())) < 1e-5
    again = load_data(data_cfg(name="digits_hard"), val_fraction=0.2)
    assert torch.equal(again.train_x, hard.train_x) and torch.equal(again.test_x, hard.test_x)


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


def test_class_grouped_order_is_seeded(digits: DataBundle) -> None:
    order = epoch_order(digits, 32, torch.Generator().manual_seed(0), 4)
    assert torch.equal(order, epoch_order(digits, 32, torch.Generator().manual_seed(0), 4))
    assert not torch.equal(order, epoch_order(digits, 32, torch.Generator().manual_seed(1), 4))
    # at B / k = 1 nothing is left over: a permutation of the whole training set
    pairs = epoch_order(digits, 2, torch.Generator().manual_seed(0), 2)
    assert sorted(pairs.tolist()) == list(range(len(digits.train_y)))


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
