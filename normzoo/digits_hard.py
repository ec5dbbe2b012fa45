"""The embedded digits and ``digits_hard``, the larger set generated from them (offline, seeded).

``normzoo.data`` loads, splits and standardises them; this module only produces the images.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "HARD_CONTRAST",
    "HARD_COPIES",
    "HARD_NOISE",
    "HARD_ROTATION",
    "HARD_SHIFT",
    "HARD_ZOOM",
    "generate_hard_digits",
]

#: ``digits_hard``'s views per source image
HARD_COPIES = 6


@functools.lru_cache(maxsize=2)
def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 digits as (N, 1, 8, 8) floats in [0, 1] and int64 labels.

    Read from the CSV that ``sklearn.datasets.load_digits`` reads, located without importing
    scikit-learn (its import costs ~1.5 s per process, paid by every job); ``load_digits``
    itself if the file is not where it has always been.
    """
    spec = importlib.util.find_spec("sklearn")
    table = None
    for base in (spec.submodule_search_locations or []) if spec else []:
        path = Path(base) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            table = np.loadtxt(path, delimiter=",")
            break
    if table is None or table.shape != (1797, 65):
        from sklearn.datasets import load_digits

        bunch = load_digits()
        table = np.column_stack([bunch.data, bunch.target])
    x = (table[:, :64].astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)  # values 0..16 -> [0, 1]
    return x, table[:, 64].astype(np.int64)


#: ``digits_hard``'s augmentation: largest rotation (degrees), relative zoom, shift (pixels of the
#: 16x16 image), contrast range and the std of the added Gaussian pixel noise (pixels in [0, 1])
HARD_ROTATION, HARD_ZOOM, HARD_SHIFT, HARD_CONTRAST, HARD_NOISE = 15.0, 0.1, 2.0, (0.7, 1.0), 0.1


@functools.lru_cache(maxsize=2)
def _hard_digits(seed: int) -> np.ndarray:
    """``digits_hard``'s images, built once per process and seed (~0.1 s)."""
    return generate_hard_digits(_digits_raw()[0], HARD_COPIES, seed)


def generate_hard_digits(images: np.ndarray, copies: int, seed: int, size: int = 16) -> np.ndarray:
    """``copies`` seeded random views of each 8x8 image: (N * copies, 1, size, size) float32.

    Sample ``i * copies + j`` is view j of image i: the image upsampled bilinearly to size x size,
    then one random affine map (rotation in +-HARD_ROTATION degrees, zoom in 1 +- HARD_ZOOM, shift
    in +-HARD_SHIFT pixels per axis; bilinear, zeros outside), multiplied by a contrast drawn from
    HARD_CONTRAST and given N(0, HARD_NOISE^2) pixel noise. Every draw comes from one
    ``torch.Generator`` seeded with ``seed``: the same call gives the same array.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(images).float().repeat_interleave(copies, dim=0)  # (N * copies, 1, 8, 8)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    n = len(x)

    def uniform(*shape: int, low: float = -1.0, high: float = 1.0) -> Tensor:
        return low + (high - low) * torch.rand(*shape, generator=g)

    angle = uniform(n) * np.deg2rad(HARD_ROTATION)
    zoom = 1.0 + uniform(n) * HARD_ZOOM
    shift = uniform(n, 2) * HARD_SHIFT * 2.0 / size  # pixels -> affine_grid's [-1, 1] units
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1
    )  # (n, 2, 3): output pixel -> where it is read in the input
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    x = torch.nn.functional.grid_sample(x, grid, mode="bilinear", align_corners=False)
    x = x * uniform(n, 1, 1, 1, low=HARD_CONTRAST[0], high=HARD_CONTRAST[1])
    x = x + HARD_NOISE * torch.randn(x.shape, generator=g)
    return x.numpy()
