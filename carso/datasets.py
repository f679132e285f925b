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
    title: str = ""  # its name in the report's text, e.g. "Fashion-MNIST"
    classes: tuple[str, ...] = ()  # class names, by label (the report's figures)

    def class_name(self, label: int) -> str:
        return self.classes[label] if label < len(self.classes) else str(label)


CIFAR100_CLASSES = tuple("""apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus
butterfly camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur
dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster
man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree
plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake
spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor train trout tulip turtle
wardrobe whale willow_tree wolf woman worm""".split())  # the fine labels, in label order (alphabetical)


DATASETS: dict[str, DatasetSpec] = {
    "fashion_mnist": DatasetSpec("fashion_mnist", "FashionMNIST", 1, 28, 10, (0.2860,), (0.3530,),
                                 "install the Debian package dataset-fashion-mnist "
                                 "(apt-get install dataset-fashion-mnist)", "Fashion-MNIST",
                                 ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                                  "Bag", "Ankle boot")),
    "mnist": DatasetSpec("mnist", "MNIST", 1, 28, 10, (0.1307,), (0.3081,),
                         "put the four MNIST IDX files (train-images-idx3-ubyte[.gz], ...) there", "MNIST",
                         tuple(str(d) for d in range(10))),
    "cifar10": DatasetSpec("cifar10", "CIFAR10", 3, 32, 10, (0.4914, 0.4822, 0.4465),
                           (0.2471, 0.2435, 0.2616),
                           "put the extracted cifar-10-batches-py folder there", "CIFAR-10",
                           ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")),
    "cifar100": DatasetSpec("cifar100", "CIFAR100", 3, 32, 100, (0.5071, 0.4865, 0.4409),
                            (0.2673, 0.2564, 0.2762),
                            "put the extracted cifar-100-python folder there", "CIFAR-100", CIFAR100_CLASSES),
}


def dataset_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise UserError(f"dataset '{name}' is unknown; `datasets` in params.yaml allows {sorted(DATASETS)}.")
    return DATASETS[name]
