"""What the supported data sets are: their names, their four IDX file names and the MD5 of each file."""

from __future__ import annotations

__all__ = ["DATASETS", "FILES", "MD5", "TEST_IMAGES", "TEST_LABELS", "TRAIN_IMAGES", "TRAIN_LABELS"]

DATASETS: tuple[str, ...] = ("mnist", "fashion_mnist")
"""Names of the supported data sets (also the names of their subfolders)."""

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
FILES: tuple[str, ...] = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)
"""The four IDX file names of each data set (stored raw, or with a ``.gz`` suffix)."""

MD5: dict[str, dict[str, str]] = {
    "mnist": {
        TRAIN_IMAGES: "6bbc9ace898e44ae57da46a324031adb",
        TRAIN_LABELS: "a25bea736e30d166cdddb491f175f624",
        TEST_IMAGES: "2646ac647ad5339dbf082846283269ea",
        TEST_LABELS: "27ae3e4e09519cfbb04c329615203637",
    },
    "fashion_mnist": {
        TRAIN_IMAGES: "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        TRAIN_LABELS: "9018921c3c673c538a1fc5bad174d6f9",
        TEST_IMAGES: "8181f5470baa50b63fa0f6fddb340f0a",
        TEST_LABELS: "15d484375f8d13e6eb1aabb0c3f46965",
    },
}
"""MD5 of each *decompressed* IDX file, per data set."""

_DISPLAY_NAMES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST"}


def _canonical(dataset: str) -> str:
    """Normalize a data set name (``"Fashion-MNIST"`` -> ``"fashion_mnist"``) and check it is supported."""
    name = str(dataset).strip().lower().replace("-", "_")
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")
    return name
