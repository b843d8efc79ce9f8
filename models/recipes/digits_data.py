"""scikit-learn's bundled digits at the tiny-digits model's resolution, and a classifier that reads them.

``load_digits`` ships 1,797 8x8 images with values 0..16. The model sees them upscaled to 16x16
(bilinear) in [-1, 1]; the classifier sees the same 16x16 upscale in [0, 1], flattened, so it
reads a generated PNG (16x16, 0..255) after dividing by 255, with no resizing.

The classifier is an RBF support-vector machine retrained from the bundled data on each use
(deterministic, a few seconds), so nothing is pickled or downloaded. It is trained on every one-pixel
shift of the training images (the diffusion model is trained with such shifts, and an SVM on raw
pixels misreads a shifted digit), and scored on the untouched held-out images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

IMAGE_SIDE = 16
HELDOUT_FRACTION = 0.25
SPLIT_SEED = 0


def load_upscaled_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as (N, 1, 16, 16) float32 in [0, 1] (bilinear upscale) and (N,) int64 labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    large = F.interpolate(small, size=(IMAGE_SIDE, IMAGE_SIDE), mode="bilinear", align_corners=False)
    return large.clamp(0.0, 1.0), torch.tensor(digits.target, dtype=torch.int64)


def with_shifts(images: torch.Tensor, max_shift: int = 1) -> torch.Tensor:
    """(N, 1, H, W) in [0, 1] -> (S*N, 1, H, W): every shift of up to ``max_shift`` pixels, zero-filled."""
    side = images.shape[-1]
    padded = F.pad(images, (max_shift,) * 4)
    span = range(2 * max_shift + 1)
    return torch.cat([padded[:, :, dy:dy + side, dx:dx + side] for dy in span for dx in span])


def images_to_features(images: np.ndarray) -> np.ndarray:
    """(N, 16, 16[, 1]) images, uint8 0..255 or float 0..1 -> (N, 256) float features in [0, 1]."""
    array = np.asarray(images)
    scaled = array.astype(np.float64) / 255.0 if array.dtype == np.uint8 else array.astype(np.float64)
    return scaled.reshape(len(scaled), IMAGE_SIDE * IMAGE_SIDE)


@dataclass
class DigitClassifier:
    model: object
    heldout_accuracy: float
    train_size: int
    heldout_size: int

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.model.predict(images_to_features(images))


def train_digit_classifier() -> DigitClassifier:
    """An RBF SVM on the shifted copies of a stratified 75 % split, scored on the held-out 25 %."""
    from sklearn.model_selection import train_test_split
    from sklearn.svm import SVC

    images, labels = load_upscaled_digits()
    train_index, test_index = train_test_split(np.arange(len(labels)), test_size=HELDOUT_FRACTION,
                                               random_state=SPLIT_SEED, stratify=labels.numpy())
    train_images = with_shifts(images[train_index])
    train_labels = labels[train_index].repeat(len(train_images) // len(train_index)).numpy()
    model = SVC(kernel="rbf", C=10.0, gamma="scale").fit(images_to_features(train_images.numpy()), train_labels)
    test_labels = labels[test_index].numpy()
    accuracy = float((model.predict(images_to_features(images[test_index].numpy())) == test_labels).mean())
    return DigitClassifier(model, accuracy, len(train_index), len(test_index))


if __name__ == "__main__":
    classifier = train_digit_classifier()
    print(f"held-out accuracy {classifier.heldout_accuracy:.4f} "
          f"({classifier.train_size} train / {classifier.heldout_size} held out)")
