"""Small data sets that need no download, for examples and tests.

``load_digits_28``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes, shipped
inside the ``scikit-learn`` package, no network), upsampled to 28x28 so MNIST-shaped models
(:class:`triton_parallel_layers.models.cnn.SimpleCNN`) take them as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["load_digits_28"]


def load_digits_28(
    *, size: int = 28, test_fraction: float = 0.2, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The scikit-learn digits as ``(x_train, y_train, x_test, y_test)``.

    Images are ``(N, 1, size, size)`` fp32, bilinearly upsampled from 8x8 and standardized with the
    training split's mean and std; labels ``(N,)`` int64 in ``[0, 10)``. The split is a random
    permutation drawn from ``seed`` (``test_fraction`` of the 1,797 images held out).

    Raises:
        ImportError: scikit-learn is not installed (``pip install scikit-learn``, or the ``dev``
            extra of this package).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction}: expected a value in (0, 1)")
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "load_digits_28 needs scikit-learn (pip install scikit-learn, or the package's "
            "'dev' extra)"
        ) from e
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    labels = torch.tensor(digits.target, dtype=torch.int64)
    images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = round(len(labels) * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    mean, std = images[train].mean(), images[train].std()
    images = (images - mean) / std
    return images[train], labels[train], images[test], labels[test]
