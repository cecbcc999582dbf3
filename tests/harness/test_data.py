"""Data sets, the paper's augmentation and the CIFAR readers (on small synthetic files)."""
import pickle

import numpy as np
import pytest
import torch

from hessfast.harness.data import Augment, BatchLoader, cifar10, cifar100, digits, gmm, imagenet32, load_data


def test_augment_crops_a_shifted_window_of_the_zero_padded_image():
    x = torch.arange(1, 1 + 2 * 3 * 5 * 5, dtype=torch.float32).reshape(2, 3, 5, 5)
    gen = torch.Generator().manual_seed(0)
    out = Augment(flip=False, pad=2)(x, gen)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):  # each output must equal some 5x5 window of its padded image
        hits = [(dy, dx) for dy in range(5) for dx in range(5)
                if torch.equal(padded[i, :, dy:dy + 5, dx:dx + 5], out[i])]
        assert hits, f"image {i} is not a crop of its padded version"


def test_augment_flip_only_mirrors_or_keeps():
    x = torch.randn(64, 1, 4, 4)
    out = Augment(flip=True, pad=0)(x, torch.Generator().manual_seed(1))
    same = (out == x).flatten(1).all(1)
    flipped = (out == x.flip(3)).flatten(1).all(1)
    assert bool((same | flipped).all())
    assert 10 < int(flipped.sum()) < 54  # about half are flipped


def test_loader_order_depends_only_on_seed_and_epoch():
    x, y = torch.arange(50.0).reshape(50, 1), torch.arange(50)
    a, b = BatchLoader(x, y, 7, seed=3), BatchLoader(x, y, 7, seed=3)
    a.set_epoch(2)
    b.set_epoch(1)
    list(b)
    b.set_epoch(2)
    ya, yb = torch.cat([t for _, t in a]), torch.cat([t for _, t in b])
    assert torch.equal(ya, yb) and sorted(ya.tolist()) == list(range(50))
    a.set_epoch(3)
    assert not torch.equal(torch.cat([t for _, t in a]), ya)
    assert len(a) == 8 and len(BatchLoader(x, y, 7, drop_last=True)) == 7


def test_embedded_data_sets():
    d = digits()
    assert d.in_shape == (1, 8, 8) and d.num_classes == 10
    assert d.n_train + d.val_x.shape[0] == 1797
    assert abs(float(d.train_x.mean())) < 1e-4
    g = gmm(n_train=300, n_val=100, dim=7)
    assert g.train_x.shape == (300, 7) and g.val_x.shape == (100, 7)
    assert set(g.train_y.tolist()) == set(range(10))


def _write_cifar_bin(path, labels, label_bytes=1):
    rows = []
    for k, lab in enumerate(labels):
        head = [lab] if label_bytes == 1 else [lab // 10, lab]
        img = (np.arange(3072) + k) % 256
        rows.append(np.concatenate([head, img]).astype(np.uint8))
    path.write_bytes(np.stack(rows).tobytes())


def test_cifar10_binary_reader_and_split(tmp_path):
    root = tmp_path / "cifar-10-batches-bin"
    root.mkdir()
    for i in range(1, 6):
        _write_cifar_bin(root / f"data_batch_{i}.bin", [i, (i + 1) % 10, 3])
    _write_cifar_bin(root / "test_batch.bin", [9, 8])
    d = cifar10(root=tmp_path, n_val=5)
    assert d.n_train == 10 and d.val_x.shape == (5, 3, 32, 32) and d.num_classes == 10
    t = cifar10(root=tmp_path, use_test=True)
    assert t.n_train == 15 and t.val_y.tolist() == [9, 8]
    assert d.augment == Augment(flip=True, pad=4)


def test_cifar100_binary_uses_fine_labels(tmp_path):
    root = tmp_path / "cifar-100-binary"
    root.mkdir()
    _write_cifar_bin(root / "train.bin", [42, 99, 7, 0], label_bytes=2)
    _write_cifar_bin(root / "test.bin", [55], label_bytes=2)
    d = cifar100(root=tmp_path, use_test=True)
    assert sorted(d.train_y.tolist()) == [0, 7, 42, 99] and d.val_y.tolist() == [55]


def test_cifar_python_layout_is_read_without_arbitrary_unpickling(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        blob = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 2]}
        (root / name).write_bytes(pickle.dumps(blob))
    assert cifar10(root=tmp_path, use_test=True).n_train == 10
    # a batch file that asks for any other global is refused
    (root / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8),
                                                    b"labels": [1], b"x": torch.nn.Identity}))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        cifar10(root=tmp_path, use_test=True)


def test_missing_data_says_where_to_put_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-bin.*download=True"):
        cifar10(root=tmp_path)
    with pytest.raises(FileNotFoundError, match="cifar-100-binary/train.bin"):
        cifar100(root=tmp_path)
    with pytest.raises(FileNotFoundError, match="train_data_batch_1.npz"):
        imagenet32(root=tmp_path)


def test_imagenet32_npz(tmp_path):
    d = tmp_path / "imagenet32"
    d.mkdir()
    np.savez(d / "train_data_batch_1.npz", data=np.zeros((6, 3072), np.uint8), labels=np.array([1, 2, 3, 4, 5, 1000]))
    np.savez(d / "val_data.npz", data=np.zeros((2, 3072), np.uint8), labels=np.array([1, 2]))
    b = imagenet32(root=tmp_path, use_test=True)
    assert b.train_y.tolist() == [0, 1, 2, 3, 4, 999] and b.in_shape == (3, 32, 32)


def test_load_data_by_name_and_errors():
    assert load_data("gmm", n_train=50, n_val=10, dim=3).train_x.shape == (50, 3)
    with pytest.raises(ValueError, match="unknown data set 'mnist'"):
        load_data("mnist")
