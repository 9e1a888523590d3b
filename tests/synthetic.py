"""Tiny learnable image data for end-to-end tests of the training programs."""

import numpy as np


def learnable_images(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` uint8 28x28 images and labels: class c has a bright band at rows 2c..2c+5."""
    labels = rng.integers(0, 10, n)
    images = rng.integers(0, 80, (n, 28, 28)).astype(np.uint8)
    for i, c in enumerate(labels):
        images[i, 2 * c : 2 * c + 6, 4:24] = 220
    return images, labels
