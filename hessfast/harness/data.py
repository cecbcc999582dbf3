"""Data sets for the harness: embedded defaults and the paper's image data read from local folders.

Embedded (no download): ``digits`` (scikit-learn's 1,797 handwritten 8x8 digits) and ``gmm``
(the 10-class Gaussian mixture of Figure 27). From a local folder: ``cifar10``, ``cifar100``
(the "binary version" ``.bin`` files, or torchvision's ``cifar-*-python`` folder read by a restricted
unpickler that only rebuilds numpy arrays) and ``imagenet32`` (the downsampled ImageNet ``.npz``
files, read with ``allow_pickle=False``). Nothing is downloaded unless ``download=True``.

Everything is held as tensors in memory; :class:`BatchLoader` shuffles with a generator seeded by
``(seed, epoch)`` so that a resumed run sees exactly the batches an uninterrupted one would, and
applies the paper's augmentation (random horizontal flips, 4-pixel zero padding, random 32x32 crops)
as tensor operations on each batch.
"""
from __future__ import annotations

import io
import os
import pickle
import tarfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Tuple

import numpy as np
import torch

from .models import call_with_accepted, resolve_callable

# --------------------------------------------------------------------------------------------------
# augmentation


@dataclass(frozen=True)
class Augment:
    """Random horizontal flip (p = 1/2), zero padding by ``pad`` pixels and a random crop back to size."""

    flip: bool = True
    pad: int = 4

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """``x``: (B, C, H, W) images; returns augmented images of the same shape."""
        if x.dim() != 4:
            raise ValueError(f"augmentation needs images of shape (B, C, H, W), got {tuple(x.shape)}.")
        b, _, h, w = x.shape
        if self.flip:
            mask = torch.rand(b, generator=gen) < 0.5
            x = torch.where(mask[:, None, None, None], x.flip(3), x)
        if self.pad > 0:
            p = self.pad
            padded = torch.nn.functional.pad(x, (p, p, p, p))
            dy = torch.randint(0, 2 * p + 1, (b,), generator=gen)
            dx = torch.randint(0, 2 * p + 1, (b,), generator=gen)
            # gather one crop per image with index arithmetic instead of a Python loop
            rows = (dy[:, None] + torch.arange(h)[None, :])  # (B, H)
            cols = (dx[:, None] + torch.arange(w)[None, :])  # (B, W)
            bidx = torch.arange(b)[:, None, None]
            x = padded.permute(0, 2, 3, 1)[bidx, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
        return x.contiguous()


# --------------------------------------------------------------------------------------------------
# in-memory data set and loader


@dataclass
class DataBundle:
    """Train/validation tensors and what a model needs to know about them."""

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    num_classes: int
    augment: Optional[Augment] = None
    info: Dict[str, object] = field(default_factory=dict)

    @property
    def in_shape(self) -> Tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    @property
    def n_train(self) -> int:
        return int(self.train_x.shape[0])


class BatchLoader:
    """Mini-batches of in-memory tensors; the order of epoch ``e`` depends only on ``(seed, e)``.

    Iterating yields ``(inputs, targets)`` pairs, so a loader is also valid ``data`` for
    ``hessfast.lanczos`` (with ``shuffle=False`` and no augmentation it is the whole data set).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool = True,
                 seed: int = 0, augment: Optional[Augment] = None, drop_last: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"inputs hold {x.shape[0]} samples but targets hold {y.shape[0]}.")
        self.x, self.y = x, y
        self.batch_size = int(batch_size)
        self.shuffle, self.seed, self.augment, self.drop_last = shuffle, seed, augment, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        n = self.x.shape[0]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        n = self.x.shape[0]
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        for k in range(len(self)):
            idx = order[k * self.batch_size:(k + 1) * self.batch_size]
            xb = self.x[idx]
            if self.augment is not None:
                xb = self.augment(xb, gen)
            yield xb, self.y[idx]


def random_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, count: int, seed: int):
    """``count`` batches of ``batch_size`` samples drawn without replacement within each batch."""
    gen = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    b = min(batch_size, n)
    out = []
    for _ in range(count):
        idx = torch.randperm(n, generator=gen)[:b]
        out.append((x[idx], y[idx]))
    return out


# --------------------------------------------------------------------------------------------------
# embedded data sets


def _split(x: torch.Tensor, y: torch.Tensor, n_val: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(x.shape[0], generator=gen)
    val, tr = perm[:n_val], perm[n_val:]
    return x[tr], y[tr], x[val], y[val]


def digits(n_val: int = 360, seed: int = 0) -> DataBundle:
    """scikit-learn's handwritten digits as (1, 8, 8) images, standardised with train statistics.

    1,797 samples, 10 classes; ``n_val`` of them (seeded split) are held out for validation.
    Augmentation for ``augmentation`` recipes: 1-pixel padding and crops, no flips (digits are not
    mirror-symmetric).
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover - sklearn is in the demo extra
        raise ImportError("the digits data set needs scikit-learn: pip install 'hessfast[demo]'") from None
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).reshape(-1, 1, 8, 8)
    y = torch.tensor(d.target, dtype=torch.long)
    tx, ty, vx, vy = _split(x, y, n_val, seed)
    mean, std = tx.mean(), tx.std()
    return DataBundle("digits", (tx - mean) / std, ty, (vx - mean) / std, vy, 10,
                      augment=Augment(flip=False, pad=1), info={"source": "sklearn.datasets.load_digits"})


def gmm(n_train: int = 2000, n_val: int = 500, dim: int = 50, num_classes: int = 10, separation: float = 1.0,
        seed: int = 0) -> DataBundle:
    """The 10-class Gaussian mixture of Figure 27 (our parameters: the paper does not give them).

    Class means have independent N(0, separation^2) coordinates; a sample is its class mean plus
    N(0, I_dim) noise; classes are balanced.
    """
    gen = torch.Generator().manual_seed(10_007 + seed)
    means = separation * torch.randn(num_classes, dim, generator=gen)
    n = n_train + n_val
    y = torch.arange(n) % num_classes
    y = y[torch.randperm(n, generator=gen)]
    x = means[y] + torch.randn(n, dim, generator=gen)
    return DataBundle("gmm", x[:n_train], y[:n_train], x[n_train:], y[n_train:], num_classes,
                      info={"dim": dim, "separation": separation})


# --------------------------------------------------------------------------------------------------
# CIFAR and ImageNet32 from local folders

CIFAR_URLS = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
}
_CIFAR_MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
_CIFAR_STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Rebuilds only plain containers and numpy arrays; any other global is refused."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch file.")


def _read_cifar_bin(files, label_bytes: int, label_index: int):
    xs, ys = [], []
    rec = label_bytes + 3072
    for f in files:
        raw = np.frombuffer(Path(f).read_bytes(), dtype=np.uint8)
        if raw.size % rec:
            raise ValueError(f"{f} is not a CIFAR binary batch ({raw.size} bytes is not a multiple of {rec}).")
        raw = raw.reshape(-1, rec)
        ys.append(raw[:, label_index].astype(np.int64))
        xs.append(raw[:, label_bytes:].reshape(-1, 3, 32, 32))
    return np.concatenate(xs), np.concatenate(ys)


def _read_cifar_python(files, key: bytes):
    xs, ys = [], []
    for f in files:
        with open(f, "rb") as fh:
            d = _NumpyOnlyUnpickler(fh, encoding="bytes").load()
        xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(d[key], dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def _cifar_missing(name: str, root: Path) -> FileNotFoundError:
    sub = "cifar-10-batches-bin/data_batch_{1..5}.bin" if name == "cifar10" else "cifar-100-binary/train.bin"
    return FileNotFoundError(
        f"{name} was not found under {root}. Put the CIFAR binary version there, so that {root / sub} exists "
        f"(get it from {CIFAR_URLS[name]} and extract it with 'tar xzf'), or torchvision's "
        f"'{'cifar-10-batches-py' if name == 'cifar10' else 'cifar-100-python'}' folder; or pass "
        f"download=True (command line: --download) to fetch it. Set the folder with root= or $HESSFAST_DATA."
    )


def _download(url: str, root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    with urllib.request.urlopen(url) as r:  # noqa: S310 - the URL is one of the fixed ones above
        blob = r.read()
    with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
        for member in tar.getmembers():
            if not member.isfile() or member.name.startswith("/") or ".." in Path(member.name).parts:
                continue
            tar.extract(member, root)


def load_cifar_arrays(name: str, root: Path, download: bool = False):
    """(train_x uint8 (50000,3,32,32), train_y, test_x, test_y) from the binary or torchvision layout."""
    root = Path(root)
    if name == "cifar10":
        b = root / "cifar-10-batches-bin"
        if not b.is_dir() and download:
            _download(CIFAR_URLS[name], root)
        if b.is_dir():
            tr = _read_cifar_bin([b / f"data_batch_{i}.bin" for i in range(1, 6)], 1, 0)
            te = _read_cifar_bin([b / "test_batch.bin"], 1, 0)
            return (*tr, *te)
        p = root / "cifar-10-batches-py"
        if p.is_dir():
            tr = _read_cifar_python([p / f"data_batch_{i}" for i in range(1, 6)], b"labels")
            te = _read_cifar_python([p / "test_batch"], b"labels")
            return (*tr, *te)
    elif name == "cifar100":
        b = root / "cifar-100-binary"
        if not b.is_dir() and download:
            _download(CIFAR_URLS[name], root)
        if b.is_dir():  # 2 label bytes: coarse, fine; we use the 100 fine labels
            tr = _read_cifar_bin([b / "train.bin"], 2, 1)
            te = _read_cifar_bin([b / "test.bin"], 2, 1)
            return (*tr, *te)
        p = root / "cifar-100-python"
        if p.is_dir():
            tr = _read_cifar_python([p / "train"], b"fine_labels")
            te = _read_cifar_python([p / "test"], b"fine_labels")
            return (*tr, *te)
    else:
        raise ValueError(f"unknown CIFAR variant {name!r}")
    raise _cifar_missing(name, root)


def _default_root(root) -> Path:
    return Path(root if root is not None else os.environ.get("HESSFAST_DATA", "./data"))


def _cifar(name: str, root=None, download: bool = False, n_val: int = 5000, seed: int = 0,
           use_test: bool = False) -> DataBundle:
    tx, ty, ex, ey = load_cifar_arrays(name, _default_root(root), download)
    x = torch.from_numpy(tx).float().div_(255)
    y = torch.from_numpy(ty)
    if use_test:
        vx, vy = torch.from_numpy(ex).float().div_(255), torch.from_numpy(ey)
    else:  # the paper's split: 45,000 train / 5,000 validation
        x, y, vx, vy = _split(x, y, n_val, seed)
    x = (x - _CIFAR_MEAN) / _CIFAR_STD
    vx = (vx - _CIFAR_MEAN) / _CIFAR_STD
    return DataBundle(name, x, y, vx, vy, 10 if name == "cifar10" else 100, augment=Augment(True, 4),
                      info={"validation": "test set" if use_test else f"{n_val} held out of the training set"})


def cifar10(root=None, download: bool = False, n_val: int = 5000, seed: int = 0, use_test: bool = False) -> DataBundle:
    """CIFAR-10 from ``root`` (default ``$HESSFAST_DATA`` or ./data); 45k/5k split unless ``use_test``."""
    return _cifar("cifar10", root, download, n_val, seed, use_test)


def cifar100(root=None, download: bool = False, n_val: int = 5000, seed: int = 0, use_test: bool = False) -> DataBundle:
    """CIFAR-100 (fine labels) from ``root``; 45k/5k split as in Section 8 unless ``use_test``."""
    return _cifar("cifar100", root, download, n_val, seed, use_test)


def imagenet32(root=None, n_val: int = 10000, seed: int = 0, use_test: bool = False, **_) -> DataBundle:
    """Downsampled ImageNet 32x32 from the ``.npz`` files of Chrabaszcz et al. (2017).

    Expects ``<root>/imagenet32/train_data_batch_{1..10}.npz`` and ``val_data.npz`` with arrays ``data``
    (N x 3072 uint8) and ``labels`` (1-based). There is no public download without a login, so
    ``download`` is not offered.
    """
    root = _default_root(root) / "imagenet32"
    train_files = sorted(root.glob("train_data_batch_*.npz"))
    if not train_files:
        raise FileNotFoundError(
            f"imagenet32 was not found: put train_data_batch_1.npz ... train_data_batch_10.npz and val_data.npz "
            f"(the 'Imagenet32_train_npz' / 'Imagenet32_val_npz' archives from image-net.org) in {root}, "
            f"or set root= / $HESSFAST_DATA to the folder that holds 'imagenet32/'.")

    def read(f):
        with np.load(f, allow_pickle=False) as z:
            return z["data"].reshape(-1, 3, 32, 32), z["labels"].astype(np.int64) - 1

    parts = [read(f) for f in train_files]
    x = torch.from_numpy(np.concatenate([p[0] for p in parts])).float().div_(255)
    y = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    if use_test:
        vx, vy = read(root / "val_data.npz")
        vx, vy = torch.from_numpy(vx).float().div_(255), torch.from_numpy(vy)
    else:
        x, y, vx, vy = _split(x, y, n_val, seed)
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    std = x.std(dim=(0, 2, 3), keepdim=True)
    return DataBundle("imagenet32", (x - mean) / std, y, (vx - mean) / std, vy, 1000, augment=Augment(True, 4))


# --------------------------------------------------------------------------------------------------
# registry

DATASETS: Dict[str, Callable[..., DataBundle]] = {
    "digits": digits, "gmm": gmm, "cifar10": cifar10, "cifar100": cifar100, "imagenet32": imagenet32,
}


def load_data(name: str, **kwargs) -> DataBundle:
    """A registered data set by name, or ``module:function`` returning a :class:`DataBundle` or
    ``(x, y)`` tensors (then 20% is held out for validation, seeded)."""
    if ":" not in name and name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {sorted(DATASETS)} or give 'module:function'.")
    fn = resolve_callable(name, DATASETS, "data")
    out = call_with_accepted(fn, **kwargs)
    if isinstance(out, DataBundle):
        return out
    if isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out):
        x, y = out
        if y.dtype != torch.long:
            raise TypeError(f"data {name!r}: class targets must be int64 (torch.long), got {y.dtype}.")
        tx, ty, vx, vy = _split(x, y, max(1, x.shape[0] // 5), kwargs.get("seed", 0))
        return DataBundle(name, tx, ty, vx, vy, int(y.max()) + 1)
    raise TypeError(f"data factory {name!r} returned {type(out).__name__}; return a DataBundle or (x, y) tensors.")
