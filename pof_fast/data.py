"""Data for the command line: scikit-learn's digits (shipped with scikit-learn), CIFAR-10/100 and image folders.

Nothing is ever downloaded. CIFAR is read from the python-pickle batches that torchvision also reads
(``cifar-10-batches-py/data_batch_1..5, test_batch``; ``cifar-100-python/train, test``); an image folder is
``ROOT/train/<class>/*`` and ``ROOT/val/<class>/*`` (or ``ROOT/test``), the layout of torchvision's
``ImageFolder``, with PNG/JPEG/... images (Pillow) or ``.npy`` arrays (``HxW`` or ``HxWxC``, uint8 or [0, 1]).

A split yields raw batches (uint8 or float images in [0, 1], int64 labels); :func:`prepare` moves them to
the device, applies the standard augmentation to training batches (random crop with zero padding of 1/8 of
the side, horizontal flip; drawn from a ``torch.Generator``, so a run is reproducible and resumable) and
normalises with the dataset's mean and std.
"""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor

__all__ = ["DATASETS", "Data", "ArraySplit", "FolderSplit", "load_data", "load_digits", "load_cifar",
           "load_image_folder", "batches", "prepare", "augment"]

DATASETS = ("digits", "cifar10", "cifar100", "folder")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")
CIFAR_MEAN_STD = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class ArraySplit(torch.utils.data.Dataset):
    """A split held in memory: ``x`` ``[N, C, H, W]`` (uint8, or float in [0, 1]) and ``y`` ``[N]`` int64."""

    def __init__(self, x: Tensor, y: Tensor) -> None:
        self.x, self.y = x, y.long()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> Tuple[Tensor, Tensor]:
        return self.x[i], self.y[i]

    def batch(self, index: Tensor) -> Tuple[Tensor, Tensor]:
        return self.x[index], self.y[index]


class FolderSplit(torch.utils.data.Dataset):
    """Image files decoded on access into uint8 ``[3, size, size]`` tensors (resized when needed)."""

    def __init__(self, files: Sequence[Path], labels: Sequence[int], image_size: int) -> None:
        self.files, self.image_size = list(files), int(image_size)
        self.y = torch.tensor(list(labels), dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Tuple[Tensor, Tensor]:
        return _decode(self.files[i], self.image_size), self.y[i]

    def batch(self, index: Tensor) -> Tuple[Tensor, Tensor]:
        return torch.stack([_decode(self.files[i], self.image_size) for i in index.tolist()]), self.y[index]


@dataclass
class Data:
    """A dataset: its two splits, classes, input shape ``[C, H, W]``, normalisation and default augmentation."""

    name: str
    train: Union[ArraySplit, FolderSplit]
    test: Union[ArraySplit, FolderSplit]
    num_classes: int
    input_shape: Tuple[int, int, int]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    augment: str  # "standard" or "none"
    stats_on: Dict[str, Tuple[Tensor, Tensor]] = field(default_factory=dict, repr=False)  # mean, std per device


# -- loaders ---------------------------------------------------------------------------------------------


def load_digits() -> Data:
    """scikit-learn's digits: 1,797 8x8 grey images of 10 classes, shipped inside scikit-learn.

    A fixed 80/20 split (1,437 training, 360 test rows; the same for every seed, so seeds vary only the
    training), pixels scaled to [0, 1] and not normalised, no augmentation (a flipped digit is another digit).
    """
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError as exc:
        raise RuntimeError("the digits data needs scikit-learn: pip install scikit-learn "
                           "(or pip install 'pof-fast[demo]')") from exc
    raw = sk_digits()
    x = torch.tensor(raw.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(raw.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    split = int(0.8 * len(y))
    train, test = order[:split], order[split:]
    return Data("digits", ArraySplit(x[train], y[train]), ArraySplit(x[test], y[test]), 10, (1, 8, 8),
                (0.0,), (1.0,), "none")


def _cifar_folder(root: Path, name: str) -> Path:
    sub = "cifar-10-batches-py" if name == "cifar10" else "cifar-100-python"
    needed = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"] \
        if name == "cifar10" else ["train", "test"]
    for folder in (root / sub, root):
        if all((folder / f).is_file() for f in needed):
            return folder
    archive = "cifar-10-python.tar.gz" if name == "cifar10" else "cifar-100-python.tar.gz"
    raise FileNotFoundError(
        f"{name}: no {sub}/ with {', '.join(needed)} under {root}. pof-fast never downloads: get {archive} from "
        f"https://www.cs.toronto.edu/~kriz/cifar.html, extract it into {root} (tar xzf {archive} -C {root}), so "
        f"that {root / sub / needed[0]} exists, and pass --data-dir {root}")


def _unpickle(path: Path) -> dict:
    # The CIFAR batches are Python pickles (the format torchvision reads too): read only files you trust.
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def load_cifar(root: Union[str, os.PathLike], name: str = "cifar10") -> Data:
    """CIFAR-10 or CIFAR-100 from its python-pickle batches in ``root`` (or ``root/cifar-10-batches-py``)."""
    if name not in CIFAR_MEAN_STD:
        raise ValueError(f"name must be 'cifar10' or 'cifar100', got {name!r}")
    folder = _cifar_folder(Path(root), name)
    files = ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]) if name == "cifar10" else (["train"], ["test"])
    key = b"labels" if name == "cifar10" else b"fine_labels"
    splits = []
    for names in files:
        parts = [_unpickle(folder / f) for f in names]
        x = np.concatenate([np.asarray(p[b"data"], dtype=np.uint8) for p in parts]).reshape(-1, 3, 32, 32)
        y = np.concatenate([np.asarray(p[key], dtype=np.int64) for p in parts])
        splits.append(ArraySplit(torch.from_numpy(x.copy()), torch.from_numpy(y)))
    mean, std = CIFAR_MEAN_STD[name]
    return Data(name, splits[0], splits[1], 10 if name == "cifar10" else 100, (3, 32, 32), mean, std, "standard")


def _decode(path: Path, size: int) -> Tensor:
    """One image as uint8 ``[3, size, size]``."""
    if path.suffix.lower() == ".npy":
        array = np.load(path, allow_pickle=False)
        if array.dtype != np.uint8:
            array = (np.clip(array.astype(np.float32), 0.0, 1.0) * 255.0).round().astype(np.uint8)
    else:
        try:
            from PIL import Image
        except ImportError as exc:
            raise RuntimeError(f"reading {path.name} needs Pillow: pip install pillow (or store .npy arrays)") from exc
        with Image.open(path) as image:
            array = np.array(image.convert("RGB"))
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(f"{path}: expected an HxW or HxWxC (C = 1, 3 or 4) image, got shape {array.shape}")
    image = torch.from_numpy(np.array(array[:, :, :3], copy=True)).permute(2, 0, 1)
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    if image.shape[1:] != (size, size):
        image = torch.nn.functional.interpolate(image[None].float(), size=(size, size), mode="bilinear",
                                                antialias=True, align_corners=False)[0].round().clamp(0, 255)
    return image.to(torch.uint8).contiguous()


def _folder_split(folder: Path, classes: Optional[List[str]], size: int) -> Tuple[FolderSplit, List[str]]:
    found = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if classes is None:
        classes = found
    extra = sorted(set(found) - set(classes))
    if extra:
        raise ValueError(f"{folder} has class folders that the training split lacks: {', '.join(extra[:5])}")
    files, labels = [], []
    for label, name in enumerate(classes):
        if not (folder / name).is_dir():
            continue
        for f in sorted((folder / name).iterdir()):
            if f.suffix.lower() in IMAGE_EXTENSIONS + (".npy",):
                files.append(f)
                labels.append(label)
    if not files:
        raise FileNotFoundError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)} or .npy) in its class folders")
    return FolderSplit(files, labels, size), classes


def load_image_folder(root: Union[str, os.PathLike], image_size: int = 32) -> Data:
    """``root/train/<class>/*`` and ``root/val/<class>/*`` (or ``root/test``), images resized to ``image_size``.

    Classes are the training split's folder names, sorted (torchvision's ImageFolder order). Normalised with
    ImageNet's mean and std; standard augmentation.
    """
    root = Path(root)
    train = root / "train"
    test = next((root / t for t in ("val", "test") if (root / t).is_dir()), None)
    if not train.is_dir() or test is None:
        raise FileNotFoundError(f"image folder {root}: expected {root / 'train'}/<class>/<images> and "
                                f"{root / 'val'}/<class>/<images> (or {root / 'test'}/...)")
    train_split, classes = _folder_split(train, None, image_size)
    test_split, _ = _folder_split(test, classes, image_size)
    if len(classes) < 2:
        raise ValueError(f"image folder {root}: a classifier needs at least 2 classes, found {len(classes)}")
    mean, std = IMAGENET_MEAN_STD
    return Data("folder", train_split, test_split, len(classes), (3, image_size, image_size), mean, std, "standard")


def load_data(name: str, data_dir: Optional[Union[str, os.PathLike]] = None, image_size: int = 32) -> Data:
    """``digits`` (default, no files needed), ``cifar10``/``cifar100`` or ``folder`` (both need ``data_dir``)."""
    if name not in DATASETS:
        raise ValueError(f"unknown data {name!r}; choose from {', '.join(DATASETS)}")
    if name == "digits":
        return load_digits()
    if data_dir is None:
        raise ValueError(f"--data {name} needs --data-dir (the folder that holds it; nothing is downloaded)")
    if not Path(data_dir).is_dir():
        raise FileNotFoundError(f"--data-dir {data_dir} is not a folder")
    if name == "folder":
        return load_image_folder(data_dir, image_size)
    return load_cifar(data_dir, name)


# -- batches ---------------------------------------------------------------------------------------------


def batches(split: Union[ArraySplit, FolderSplit], index_batches: Iterable[Tensor],
            workers: int = 0) -> Iterator[Tuple[Tensor, Tensor]]:
    """Raw ``(x, y)`` batches for the given index batches, in order (image folders: ``workers`` processes)."""
    if workers <= 0 or isinstance(split, ArraySplit):
        for index in index_batches:
            yield split.batch(index)
        return
    loader = torch.utils.data.DataLoader(split, batch_sampler=[i.tolist() for i in index_batches],
                                         num_workers=workers, collate_fn=_collate)
    yield from loader


def _collate(items: List[Tuple[Tensor, Tensor]]) -> Tuple[Tensor, Tensor]:
    return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])


def augment(x: Tensor, gen: torch.Generator) -> Tensor:
    """Random crop with zero padding of ``H // 8`` and a horizontal flip, per image (``x`` in [0, 1])."""
    n, _, h, w = x.shape
    pad = max(h // 8, 1)
    shifts = torch.randint(0, 2 * pad + 1, (2, n), generator=gen).to(x.device)
    flips = (torch.rand(n, generator=gen) < 0.5).to(x.device)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = shifts[0, :, None] + torch.arange(h, device=x.device)
    cols = shifts[1, :, None] + torch.arange(w, device=x.device)
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    n_idx = torch.arange(n, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[n_idx, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def prepare(data: Data, x: Tensor, y: Tensor, device: torch.device, gen: Optional[torch.Generator] = None,
            augmentation: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """Float inputs on ``device``: scaled to [0, 1], augmented when ``gen`` is given (and ``augmentation``,
    default the dataset's, is ``"standard"``), then normalised."""
    x = x.to(device, non_blocking=True)
    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
    if gen is not None and (augmentation or data.augment) == "standard":
        x = augment(x, gen)
    if any(m != 0.0 for m in data.mean) or any(s != 1.0 for s in data.std):
        key = str(device)
        if key not in data.stats_on:  # once per device: no host-to-device copy per batch
            data.stats_on[key] = (torch.tensor(data.mean).view(1, -1, 1, 1).to(device),
                                  torch.tensor(data.std).view(1, -1, 1, 1).to(device))
        mean, std = data.stats_on[key]
        x = (x - mean) / std
    return x, y.to(device, non_blocking=True)
