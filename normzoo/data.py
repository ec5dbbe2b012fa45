"""Data sets held in memory on the training device, and the order in which batches are drawn.

* ``digits`` — scikit-learn's digits (1797 8x8 grey images, 10 classes), shipped inside scikit-learn
  so it works offline. Pixels scaled to [0, 1], a seeded stratified train/test split
  (:func:`stratified_split`, ``data.test_fraction``, ``data.split_seed``), then standardised with the
  training set's statistics.
* ``digits_hard`` — generated deterministically from the same digits (:func:`generate_hard_digits`):
  each 8x8 source image upsampled to 16x16 and drawn :data:`HARD_COPIES` times with a seeded random
  rotation, scale, shift and pixel noise. Split by *source image* (every copy of a source lies in
  one part, so no test image is a shifted twin of a training image); its test sources are exactly
  ``digits``' test split. 1797 x 6 = 10782 samples of (1, 16, 16); at the defaults (test 0.2,
  validation 0.2) 6900 train, 1728 validation, 2154 test.
* ``mnist``, ``fashion_mnist`` — torchvision's on-disk format (idx ubyte files under
  ``<data.root>/MNIST/raw`` or ``<data.root>/FashionMNIST/raw``), read by torchvision.
* ``cifar10`` — the python pickle batches under ``<data.root>/cifar-10-batches-py``, read here
  directly (torchvision's class would md5-check 170 MB on every run); ``data.download=true`` fetches
  them through torchvision.

Validation (``data.val_fraction``, default 0 = none): a seeded stratified part of the *training*
set (:func:`stratified_split` with ``data.split_seed``), so the test part never changes with it; for
``digits`` the test split is exactly the one of ``val_fraction=0``. A study makes its choices on
``val_x``/``val_y`` and only reports the test numbers.

Every set is standardised per channel with the training set's mean and std and lives on the device as
one tensor: a batch is a slice of an epoch's permutation (no DataLoader, no per-step host copies).
Batches drop the last partial one (``drop_last``), so every training batch holds exactly
``data.batch_size`` samples and a BatchNorm never sees a smaller batch than that; at
``data.batch_size=1`` a layer with batch statistics on dense features would see a single value per
channel, which the runner records as ``invalid`` before training
(:func:`normzoo.models.check_batch_size`).
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import pickle
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from normzoo.config import InvalidCombination
from normzoo.digits_hard import (
    HARD_COPIES,
    _digits_raw,
    _hard_digits,
    generate_hard_digits,
)

__all__ = [
    "GENERATED",
    "HARD_COPIES",
    "DataBundle",
    "DataNotFoundError",
    "batches_per_epoch",
    "check_available",
    "epoch_order",
    "generate_hard_digits",
    "load_data",
    "stratified_split",
]

log = logging.getLogger("normzoo.data")

_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_TORCHVISION_DIR = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")
#: data sets built in memory from scikit-learn's digits (nothing on disk to check)
GENERATED = ("digits", "digits_hard")
#: samples drawn from each source image for ``digits_hard``


class DataNotFoundError(FileNotFoundError):
    """A data set is not on disk and ``data.download`` is false; says how to get it."""


@dataclass
class DataBundle:
    """A data set on its device.

    Attributes:
        train_x, val_x, test_x: float32 inputs, (N, C, H, W), standardised with the training
            statistics (``val_x`` has N = 0 when ``data.val_fraction`` is 0).
        train_y, val_y, test_y: int64 class labels, (N,).
        num_classes: number of classes.
        input_shape: (C, H, W) of one sample.
        name: the data set's name (``digits``, ``mnist``, ...).
    """

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    input_shape: tuple[int, ...]
    name: str
    val_x: Tensor
    val_y: Tensor

    def __repr__(self) -> str:
        return (
            f"DataBundle({self.name!r}, train={len(self.train_y)}, val={len(self.val_y)}, "
            f"test={len(self.test_y)}, "
            f"input_shape={self.input_shape}, classes={self.num_classes}, "
            f"device={self.train_x.device})"
        )


def _root(cfg_data: Any) -> Path:
    root = Path(str(cfg_data.root)).expanduser()
    if not root.is_absolute():
        try:  # relative to where the command was started (Hydra may have changed the cwd)
            from hydra.utils import get_original_cwd

            root = Path(get_original_cwd()) / root
        except (ImportError, ValueError):
            root = root.resolve()
    return root


def check_available(cfg_data: Any) -> None:
    """Raise :class:`DataNotFoundError` if the data set is missing and cannot be downloaded."""
    name = str(cfg_data.name)
    if name in GENERATED or bool(cfg_data.download):
        return
    root = _root(cfg_data)
    if name in _TORCHVISION_DIR:
        where = root / _TORCHVISION_DIR[name] / "raw"
        missing = [f for f in _MNIST_FILES if not (where / f).is_file()]
    elif name == "cifar10":
        where = root / _CIFAR_DIR
        missing = [f for f in _CIFAR_FILES if not (where / f).is_file()]
    else:
        raise ValueError(f"data.name={name!r}: unknown data set")
    if missing:
        raise DataNotFoundError(
            f"data={name}: not found under data.root={str(cfg_data.root)!r} "
            f"(looked in {where}; missing {', '.join(missing)}). Get it with data.download=true "
            f"(needs internet), or set data.root to the directory that holds "
            f"{where.relative_to(root)}/."
        )


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, ...]:
    """Seeded stratified split: (train indices, test indices), each in a seeded random order.

    ``round(N * test_fraction)`` test samples, shared among the classes in proportion to their
    sizes (largest remainders get the rounding), drawn at random within each class.
    """
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * test_fraction
    n_test = np.floor(exact).astype(int)
    short = round(len(labels) * test_fraction) - int(n_test.sum())
    n_test[np.argsort(-(exact - n_test), kind="stable")[:short]] += 1
    test = []
    for c, n in zip(classes, n_test, strict=True):
        test.append(rng.permutation(np.flatnonzero(labels == c))[:n])
    test_idx = np.concatenate(test)
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    return rng.permutation(train_idx), rng.permutation(test_idx)


@contextlib.contextmanager
def _download_errors(name: str, root: str, where: str) -> Iterator[None]:
    """A failed download (no internet, a mirror down) as a one-line :class:`DataNotFoundError`
    instead of torchvision's traceback; torchvision's progress lines go to the log."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            yield
    except (OSError, RuntimeError) as exc:
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        if len(reason) > 300:
            reason = reason[:297] + "..."
        raise DataNotFoundError(
            f"data={name}: data.download=true but the download failed ({reason}). Check the "
            f"internet connection, or put the files into {Path(root) / where}/ by hand "
            f"(data.root={root!r})."
        ) from None
    finally:
        for line in out.getvalue().splitlines():
            if line.strip():
                log.info("%s", line.strip())


@functools.lru_cache(maxsize=2)
def _torchvision_raw(name: str, root: str, download: bool) -> tuple[Tensor, ...]:
    import torchvision

    cls = {"mnist": torchvision.datasets.MNIST, "fashion_mnist": torchvision.datasets.FashionMNIST}
    out = []
    for train in (True, False):
        with _download_errors(name, root, f"{_TORCHVISION_DIR[name]}/raw"):
            ds = cls[name](root, train=train, download=download)
        out += [ds.data.unsqueeze(1), ds.targets.long()]  # (N, 1, 28, 28) uint8
    return tuple(out)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    x = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    y = np.asarray(entry.get("labels", entry.get("fine_labels")), dtype=np.int64)
    return x, y


@functools.lru_cache(maxsize=2)
def _cifar_raw(root: str, download: bool) -> tuple[np.ndarray, ...]:
    where = Path(root) / _CIFAR_DIR
    if download and not all((where / f).is_file() for f in _CIFAR_FILES):
        import torchvision

        with _download_errors("cifar10", root, _CIFAR_DIR):
            torchvision.datasets.CIFAR10(root, train=True, download=True)
    parts = [_read_cifar_batch(where / f"data_batch_{i}") for i in range(1, 6)]
    train_x = np.concatenate([p[0] for p in parts])
    train_y = np.concatenate([p[1] for p in parts])
    test_x, test_y = _read_cifar_batch(where / "test_batch")
    return train_x, train_y, test_x, test_y


def _subset(x: Tensor, y: Tensor, n: int, seed: int) -> tuple[Tensor, Tensor]:
    if n <= 0 or n >= len(y):
        return x, y
    keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:n]
    return x[keep], y[keep]


def _hold_out(labels: np.ndarray, idx: np.ndarray, fraction: float, seed: int) -> tuple:
    """``idx`` split into (kept, held out): a seeded stratified ``fraction`` of it held out."""
    if fraction == 0:
        return idx, idx[:0]
    kept, held = stratified_split(labels[idx], fraction, seed)
    return idx[kept], idx[held]


def _copies_of(sources: np.ndarray, copies: int) -> np.ndarray:
    """The sample indices of ``sources`` in a set that holds ``copies`` samples per source image."""
    return (sources[:, None] * copies + np.arange(copies)).ravel()


def _embedded_split(name: str, cfg_data: Any, val_fraction: float) -> tuple[Tensor, ...]:
    """``digits`` / ``digits_hard``: (train x, y, val x, y, test x, y), split by source image."""
    x, y = _digits_raw()
    seed = int(cfg_data.split_seed)
    tr, te = stratified_split(y, float(cfg_data.test_fraction), seed)  # today's test split
    tr, va = _hold_out(y, tr, val_fraction, seed + 1)  # a seed of its own: not the test draw
    if name == "digits_hard":
        x, y = _hard_digits(seed), np.repeat(y, HARD_COPIES)
        tr, va, te = (_copies_of(idx, HARD_COPIES) for idx in (tr, va, te))
    return tuple(torch.from_numpy(a[i]) for i in (tr, va, te) for a in (x, y))


def _file_split(name: str, cfg_data: Any, val_fraction: float) -> tuple[Tensor, ...]:
    """A set with its own test part on disk: the validation part is held out of its training part."""
    root, download = str(_root(cfg_data)), bool(cfg_data.download)
    if name in _TORCHVISION_DIR:
        train_x, train_y, test_x, test_y = _torchvision_raw(name, root, download)
    elif name == "cifar10":
        train_x, train_y, test_x, test_y = (torch.from_numpy(a) for a in _cifar_raw(root, download))
    else:
        raise ValueError(f"data.name={name!r}: unknown data set")
    labels = train_y.numpy()
    tr, va = _hold_out(labels, np.arange(len(labels)), val_fraction, int(cfg_data.split_seed) + 1)
    if val_fraction == 0:  # the training set as it is on disk, in its order
        return train_x, train_y, train_x[:0], train_y[:0], test_x, test_y
    tr, va = torch.from_numpy(tr), torch.from_numpy(va)
    return train_x[tr], train_y[tr], train_x[va], train_y[va], test_x, test_y


def load_data(
    cfg_data: Any, device: torch.device | str = "cpu", *, val_fraction: float | None = None
) -> DataBundle:
    """Load ``cfg_data.name`` into memory on ``device``, standardised with training statistics.

    ``val_fraction`` (default: ``cfg_data.val_fraction``, 0 where the config has no such key):
    the stratified share of the training part held out as the validation split.

    Raises:
        DataNotFoundError: the files are missing and ``data.download`` is false.
        ValueError: an unknown data set, or ``val_fraction`` outside [0, 1).
    """
    name = str(cfg_data.name)
    if val_fraction is None:
        val_fraction = float(cfg_data.get("val_fraction", 0.0))
    if not 0 <= val_fraction < 1:
        raise ValueError(f"data.val_fraction={val_fraction}: expected 0 <= value < 1")
    check_available(cfg_data)
    split = _embedded_split if name in GENERATED else _file_split
    train_x, train_y, val_x, val_y, test_x, test_y = split(name, cfg_data, val_fraction)

    seed = int(cfg_data.split_seed)
    train_x, train_y = _subset(train_x, train_y, int(cfg_data.train_subset), seed)
    test_x, test_y = _subset(test_x, test_y, int(cfg_data.test_subset), seed + 1)
    if name not in GENERATED:  # uint8 -> [0, 1]
        train_x, val_x, test_x = (t.float() / 255.0 for t in (train_x, val_x, test_x))
    # per-channel standardisation with the training set's statistics
    mean = train_x.mean(dim=(0, 2, 3), keepdim=True)
    std = train_x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    train_x, val_x, test_x = ((t - mean) / std for t in (train_x, val_x, test_x))
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    return DataBundle(
        train_x=train_x.contiguous().to(device),
        train_y=train_y.long().to(device),
        test_x=test_x.contiguous().to(device),
        test_y=test_y.long().to(device),
        num_classes=num_classes,
        input_shape=tuple(train_x.shape[1:]),
        name=name,
        val_x=val_x.contiguous().to(device),
        val_y=val_y.long().to(device),
    )


def _check_grouping(batch_size: int, classes_per_batch: int, num_classes: int) -> int:
    if classes_per_batch > num_classes:
        raise InvalidCombination(
            f"data.classes_per_batch={classes_per_batch} exceeds the {num_classes} classes"
        )
    if batch_size % classes_per_batch != 0:
        raise InvalidCombination(
            f"data.batch_size={batch_size} is not a multiple of "
            f"data.classes_per_batch={classes_per_batch} (each class gives B/k images per batch)"
        )
    return batch_size // classes_per_batch


def _grouped_plan(counts: list[int], k: int, keys: Tensor | None) -> list[list[int]]:
    """Which classes form each batch: take k classes with the most chunks left (ties by ``keys``)."""
    left = list(counts)
    batches = []
    while sum(1 for c in left if c > 0) >= k:
        order = sorted(
            range(len(left)),
            key=lambda c: (-left[c], float(keys[len(batches), c]) if keys is not None else c),
        )
        chosen = order[:k]
        for c in chosen:
            left[c] -= 1
        batches.append(chosen)
    return batches


def _class_chunk_counts(labels: Tensor, num_classes: int, per_class: int) -> list[int]:
    counts = torch.bincount(labels.cpu(), minlength=num_classes).tolist()
    return [c // per_class for c in counts]


def batches_per_epoch(data: DataBundle, batch_size: int, classes_per_batch: int = 0) -> int:
    """Training steps in one epoch (partial batches dropped)."""
    if classes_per_batch <= 0:
        return len(data.train_y) // batch_size
    per_class = _check_grouping(batch_size, classes_per_batch, data.num_classes)
    counts = _class_chunk_counts(data.train_y, data.num_classes, per_class)
    return len(_grouped_plan(counts, classes_per_batch, None))


def epoch_order(
    data: DataBundle, batch_size: int, generator: torch.Generator, classes_per_batch: int = 0
) -> Tensor:
    """Indices of one epoch's training samples, ``batches_per_epoch * batch_size`` long, on the
    data's device: batch ``i`` is ``order[i * B:(i + 1) * B]``.

    i.i.d. (``classes_per_batch=0``): a seeded permutation, the last partial batch dropped.
    Class-grouped (k > 0): each batch holds k distinct classes with B / k images each (Ioffe 2017,
    Sec. 4.3, 16 classes x 2 images); every class's images are permuted and cut into chunks of B / k,
    each batch takes one chunk from each of the k classes with the most chunks left (ties broken
    at random), and the batches are then shuffled. Every sample appears at most once per epoch;
    left out are each class's last ``len(class) mod (B / k)`` images of this epoch's permutation
    (other ones each epoch) and the chunks left once fewer than k classes have any. Taking the
    fullest classes first keeps those under one chunk per class on digits at k <= 8; at k = the
    number of classes the smallest class sets the number of batches.
    """
    n = len(data.train_y)
    if classes_per_batch <= 0:
        steps = n // batch_size
        return torch.randperm(n, generator=generator)[: steps * batch_size].to(data.train_y.device)
    per_class = _check_grouping(batch_size, classes_per_batch, data.num_classes)
    labels = data.train_y.cpu()
    chunks: list[list[Tensor]] = []
    for c in range(data.num_classes):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=generator)]
        usable = len(idx) // per_class * per_class
        chunks.append(list(idx[:usable].split(per_class)))
    counts = [len(ch) for ch in chunks]
    steps = len(_grouped_plan(counts, classes_per_batch, None))
    keys = torch.rand(steps, data.num_classes, generator=generator)
    plan = _grouped_plan(counts, classes_per_batch, keys)
    batches = [torch.cat([chunks[c].pop() for c in chosen]) for chosen in plan]
    batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    if not batches:
        return torch.empty(0, dtype=torch.long, device=data.train_y.device)
    return torch.cat(batches).to(data.train_y.device)
