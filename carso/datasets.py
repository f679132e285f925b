"""The datasets the pipeline knows: shapes, classes, normalisation and where to get them offline.

Plain Python (no torch), so that the params validation and the Snakefile can ask for an image side cheaply.
"""
from __future__ import annotations

from dataclasses import dataclass

from carso.errors import UserError


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    torchvision_class: str  # a class of torchvision.datasets, imported only by `fetch` (2-3 s of imports)
    channels: int
    side: int
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    install_hint: str  # where a user gets the files without internet


DATASETS: dict[str, DatasetSpec] = {
    "fashion_mnist": DatasetSpec("fashion_mnist", "FashionMNIST", 1, 28, 10, (0.2860,), (0.3530,),
                                 "install the Debian package dataset-fashion-mnist "
                                 "(apt-get install dataset-fashion-mnist)"),
    "mnist": DatasetSpec("mnist", "MNIST", 1, 28, 10, (0.1307,), (0.3081,),
                         "put the four MNIST IDX files (train-images-idx3-ubyte[.gz], ...) there"),
    "cifar10": DatasetSpec("cifar10", "CIFAR10", 3, 32, 10, (0.4914, 0.4822, 0.4465),
                           (0.2471, 0.2435, 0.2616),
                           "put the extracted cifar-10-batches-py folder there"),
    "cifar100": DatasetSpec("cifar100", "CIFAR100", 3, 32, 100, (0.5071, 0.4865, 0.4409),
                            (0.2673, 0.2564, 0.2762),
                            "put the extracted cifar-100-python folder there"),
}


def dataset_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise UserError(f"dataset '{name}' is unknown; `datasets` in params.yaml allows {sorted(DATASETS)}.")
    return DATASETS[name]
