import gzip

import numpy as np
import pytest
import torch

from ppl_lvm.data import (
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    binarize,
    check_data,
    load_dataset,
    load_digits,
    load_mnist,
    read_idx,
    train_test_split,
)

ROWS, COLS = 4, 3


def idx_bytes(array, magic):
    header = magic.to_bytes(4, "big") + b"".join(int(size).to_bytes(4, "big") for size in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(file, array, magic, gz=False):
    content = idx_bytes(array, magic)
    file.write_bytes(gzip.compress(content) if gz else content)
    return file


def make_split(num, seed):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(num, ROWS, COLS), dtype=np.uint8)
    images[0, 0, 0], images[0, 0, 1] = 0, 255  # both ends of the range
    labels = rng.integers(0, 10, size=num, dtype=np.uint8)
    return images, labels


@pytest.fixture
def mnist_arrays():
    return {"train": make_split(5, 0), "test": make_split(3, 1)}


def write_idx_folder(folder, arrays, gz=False):
    names = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
    for part, (images_name, labels_name) in names.items():
        images, labels = arrays[part]
        suffix = ".gz" if gz else ""
        write_idx(folder / (images_name + suffix), images, IDX_IMAGES_MAGIC, gz)
        write_idx(folder / (labels_name + suffix), labels, IDX_LABELS_MAGIC, gz)
    return folder


# ---------------------------------------------------------------------------------------------
# read_idx


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trip(tmp_path, gz):
    images, labels = make_split(5, 0)
    got_images = read_idx(write_idx(tmp_path / "images", images, IDX_IMAGES_MAGIC, gz))
    got_labels = read_idx(write_idx(tmp_path / "labels", labels, IDX_LABELS_MAGIC, gz))
    assert got_images.dtype == np.uint8 and got_images.shape == (5, ROWS, COLS)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)


def test_read_idx_detects_gzip_by_magic_bytes_not_suffix(tmp_path):
    images, _ = make_split(2, 0)
    gzipped_without_suffix = write_idx(tmp_path / "images", images, IDX_IMAGES_MAGIC, gz=True)
    plain_with_suffix = write_idx(tmp_path / "images.gz", images, IDX_IMAGES_MAGIC, gz=False)
    np.testing.assert_array_equal(read_idx(gzipped_without_suffix), images)
    np.testing.assert_array_equal(read_idx(plain_with_suffix), images)


def test_read_idx_wrong_magic(tmp_path):
    file = write_idx(tmp_path / "bad", np.zeros((2, 2, 2)), 0x00000903)
    with pytest.raises(ValueError, match="expected 0x00000803 or 0x00000801, got 0x00000903"):
        read_idx(file)
    labels = write_idx(tmp_path / "labels", np.zeros(2), IDX_LABELS_MAGIC)
    with pytest.raises(ValueError, match="expected 0x00000803, got 0x00000801"):
        read_idx(labels, magic=IDX_IMAGES_MAGIC)


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_truncated(tmp_path, gz):
    content = idx_bytes(np.zeros((2, ROWS, COLS)), IDX_IMAGES_MAGIC)[:-5]  # header 16 + 24 - 5
    file = tmp_path / "images"
    file.write_bytes(gzip.compress(content) if gz else content)
    with pytest.raises(ValueError, match="truncated IDX file .*images.*expected 40 bytes, got 35"):
        read_idx(file)


def test_read_idx_truncated_header_and_gzip_stream(tmp_path):
    short = tmp_path / "short"
    short.write_bytes(IDX_IMAGES_MAGIC.to_bytes(4, "big") + b"\x00\x00")
    with pytest.raises(ValueError, match="truncated IDX file .*expected 16 header bytes, got 6"):
        read_idx(short)
    broken = tmp_path / "broken.gz"
    broken.write_bytes(gzip.compress(idx_bytes(np.zeros((2, 2, 2)), IDX_IMAGES_MAGIC))[:-10])
    with pytest.raises(ValueError, match="corrupt gzip file .*broken.gz"):
        read_idx(broken)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        read_idx(tmp_path / "nothing-here")


# ---------------------------------------------------------------------------------------------
# load_mnist from a path


@pytest.mark.parametrize("gz", [False, True])
def test_load_mnist_idx_folder_splits(tmp_path, mnist_arrays, gz):
    write_idx_folder(tmp_path, mnist_arrays, gz)
    (train_images, train_labels), (test_images, test_labels) = mnist_arrays["train"], mnist_arrays["test"]

    x, y = load_mnist(tmp_path, split="train")
    assert x.shape == (5, ROWS * COLS) and x.dtype == torch.float32 and y.dtype == torch.long
    torch.testing.assert_close(x, torch.tensor(train_images.reshape(5, -1) / 255.0, dtype=torch.float32))
    assert x.min() == 0 and x.max() == 1
    assert y.tolist() == train_labels.tolist()

    x, y = load_mnist(tmp_path, split="test")
    assert x.shape == (3, ROWS * COLS) and y.tolist() == test_labels.tolist()

    x, y = load_mnist(tmp_path, split="all", dtype=torch.float64)
    assert x.shape == (8, ROWS * COLS) and x.dtype == torch.float64
    assert y.tolist() == train_labels.tolist() + test_labels.tolist()  # train, then test


def test_load_mnist_missing_idx_file_named(tmp_path, mnist_arrays):
    write_idx_folder(tmp_path, mnist_arrays)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    load_mnist(tmp_path, split="train")  # the train files are all there
    with pytest.raises(FileNotFoundError, match=f"t10k-labels-idx1-ubyte.*missing from folder {tmp_path}"):
        load_mnist(tmp_path, split="test")


def test_load_mnist_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="MNIST path not found"):
        load_mnist(tmp_path / "absent")


def test_load_mnist_images_and_labels_swapped(tmp_path, mnist_arrays):
    write_idx_folder(tmp_path, mnist_arrays)
    images, _ = mnist_arrays["train"]
    write_idx(tmp_path / "train-labels-idx1-ubyte", images, IDX_IMAGES_MAGIC)
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte: expected 0x00000801, got 0x00000803"):
        load_mnist(tmp_path, split="train")


def test_load_mnist_count_mismatch(tmp_path, mnist_arrays):
    write_idx_folder(tmp_path, mnist_arrays)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(4), IDX_LABELS_MAGIC)
    with pytest.raises(ValueError, match="count mismatch: .*holds 5 images but .*holds 4 labels"):
        load_mnist(tmp_path, split="train")


def test_load_mnist_npz(tmp_path, mnist_arrays):
    (train_images, train_labels), (test_images, test_labels) = mnist_arrays["train"], mnist_arrays["test"]
    file = tmp_path / "mnist.npz"
    np.savez(file, x_train=train_images, y_train=train_labels, x_test=test_images, y_test=test_labels)
    x, y = load_mnist(file)
    assert x.shape == (8, ROWS * COLS) and y.shape == (8,) and y.dtype == torch.long
    torch.testing.assert_close(x[:5], torch.tensor(train_images.reshape(5, -1) / 255.0, dtype=torch.float32))
    x, y = load_mnist(file, split="test")
    assert y.tolist() == test_labels.tolist()

    # float images already in [0, 1] are kept as they are
    np.savez(file, x_train=train_images / 255.0, y_train=train_labels)
    x, _ = load_mnist(file, split="train")
    torch.testing.assert_close(x, torch.tensor(train_images.reshape(5, -1) / 255.0, dtype=torch.float32))


def test_load_mnist_npz_errors(tmp_path, mnist_arrays):
    images, labels = mnist_arrays["train"]
    file = tmp_path / "mnist.npz"
    np.savez(file, x_train=images, y_train=labels)
    with pytest.raises(ValueError, match=r"mnist.npz has no key 'x_test'"):
        load_mnist(file, split="test")

    np.savez(file, x_train=images.astype(np.float64), y_train=labels)  # 0..255 stored as floats
    with pytest.raises(ValueError, match=r"float images .* must lie in \[0, 1\], got min 0 and max 255"):
        load_mnist(file, split="train")

    floats = images / 255.0
    floats[1, 2, 0] = np.nan
    np.savez(file, x_train=floats, y_train=labels)
    with pytest.raises(ValueError, match="NaN"):
        load_mnist(file, split="train")

    np.savez(file, x_train=images.astype(np.int32) * 2, y_train=labels)
    with pytest.raises(ValueError, match="integer images .* must lie in 0..255, got min 0 and max 510"):
        load_mnist(file, split="train")

    np.savez(file, x_train=images, y_train=labels[:4])
    with pytest.raises(ValueError, match="5 images but 4 labels"):
        load_mnist(file, split="train")

    other = tmp_path / "mnist.txt"
    other.write_text("not data")
    with pytest.raises(ValueError, match="folder of IDX files or an .npz file"):
        load_mnist(other)


def test_bad_split_and_dtype():
    with pytest.raises(ValueError, match="split must be one of"):
        load_mnist(split="validation")
    with pytest.raises(ValueError, match="floating-point"):
        load_digits(dtype=torch.int64)


# ---------------------------------------------------------------------------------------------
# bundled data sets


def test_load_digits():
    x, y = load_digits()
    assert x.shape == (1797, 64) and x.dtype == torch.float32 and x.device.type == "cpu"
    assert y.shape == (1797,) and y.dtype == torch.long and set(y.tolist()) == set(range(10))
    assert x.min() == 0 and x.max() == 1
    assert torch.allclose(x * 16, (x * 16).round())  # grey levels 0..16


def test_load_mnist_bundled():
    x, y = load_mnist()
    assert x.shape == (5000, 784) and x.dtype == torch.float32
    assert y.shape == (5000,) and y.dtype == torch.long and set(y.tolist()) == set(range(10))
    assert x.min() == 0 and x.max() == 1
    (x_train, y_train), (x_test, y_test) = load_mnist(split="train"), load_mnist(split="test")
    assert len(x_train) == 4000 and len(x_test) == 1000
    assert sorted(torch.cat([y_train, y_test]).tolist()) == sorted(y.tolist())


def test_load_dataset():
    x, y = load_dataset("digits")
    assert x.shape == (1797, 64)
    with pytest.raises(ValueError, match="known data sets: digits, mnist"):
        load_dataset("cifar")
    with pytest.raises(ValueError, match="takes no path"):
        load_dataset("digits", path="somewhere")


def test_load_dataset_mnist_path(tmp_path, mnist_arrays):
    write_idx_folder(tmp_path, mnist_arrays, gz=True)
    x, y = load_dataset("mnist", path=tmp_path, device=torch.device("cpu"))
    assert x.shape == (8, ROWS * COLS) and x.device == torch.device("cpu") and y.device == torch.device("cpu")


@pytest.mark.cuda
def test_loaders_on_cuda(tmp_path, mnist_arrays):
    write_idx_folder(tmp_path, mnist_arrays)
    x, y = load_mnist(tmp_path, device="cuda")
    assert x.is_cuda and y.is_cuda
    x, y = load_digits(device="cuda")
    assert x.is_cuda and y.is_cuda
    binary = binarize(x, "stochastic", seed=0)
    assert binary.is_cuda and torch.equal(binary, binarize(x, "stochastic", seed=0))
    # the same seed, the same pixels on the CPU and the GPU
    assert torch.equal(binary.cpu(), binarize(x.cpu(), "stochastic", seed=0))
    (x_train, y_train), _ = train_test_split(x, y)
    assert x_train.is_cuda and y_train.is_cuda


# ---------------------------------------------------------------------------------------------
# check_data, binarize, train_test_split


def test_check_data():
    x = torch.rand(4, 3)
    assert check_data(x) is x
    with pytest.raises(ValueError, match=r"images must be 2-D \[N, D\], got shape \(4, 3, 1\)"):
        check_data(x[..., None], name="images")
    with pytest.raises(ValueError, match="NaN or inf"):
        check_data(torch.tensor([[0.5, float("nan")]]))
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\], got min -0.5 and max 2"):
        check_data(torch.tensor([[-0.5, 2.0]]))
    with pytest.raises(TypeError, match="floating-point"):
        check_data(torch.ones(2, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.Tensor"):
        check_data(np.ones((2, 2)))


def test_binarize_threshold():
    x = torch.tensor([[0.0, 0.2, 0.5, 0.51, 1.0]], dtype=torch.float64)
    assert binarize(x).tolist() == [[0.0, 0.0, 0.0, 1.0, 1.0]]
    assert binarize(x, threshold=0.1).tolist() == [[0.0, 1.0, 1.0, 1.0, 1.0]]
    assert binarize(x).dtype == torch.float64


def test_binarize_stochastic():
    x = torch.rand(200, 50, generator=torch.Generator().manual_seed(0)).reshape(200, 5, 10)
    first, again = binarize(x, "stochastic", seed=1), binarize(x, "stochastic", seed=1)
    assert first.shape == x.shape and first.dtype == x.dtype
    assert torch.equal(first, again)
    assert not torch.equal(first, binarize(x, "stochastic", seed=2))
    assert set(first.unique().tolist()) == {0.0, 1.0}
    # E[Bernoulli(x)] = x; the endpoints are deterministic
    assert (first.mean() - x.mean()).abs() < 0.02
    edges = torch.tensor([[0.0, 1.0]])
    assert binarize(edges, "stochastic", seed=0).tolist() == [[0.0, 1.0]]


def test_binarize_errors():
    with pytest.raises(ValueError, match="unknown binarize method 'round'"):
        binarize(torch.rand(2, 2), "round")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        binarize(torch.tensor([[3.0]]), "stochastic")


def test_train_test_split_deterministic_and_disjoint():
    x = torch.arange(50.0)[:, None].repeat(1, 3)
    y = torch.arange(50)
    (x_train, y_train), (x_test, y_test) = train_test_split(x, y, test_fraction=0.2, seed=3)
    assert x_train.shape == (40, 3) and x_test.shape == (10, 3)
    assert torch.equal(x_train[:, 0].long(), y_train) and torch.equal(x_test[:, 0].long(), y_test)
    assert set(y_train.tolist()).isdisjoint(y_test.tolist())
    assert sorted(y_train.tolist() + y_test.tolist()) == list(range(50))

    x_train_again, x_test_again = train_test_split(x, test_fraction=0.2, seed=3)
    assert torch.equal(x_train_again, x_train) and torch.equal(x_test_again, x_test)
    _, other_test = train_test_split(x, test_fraction=0.2, seed=4)
    assert not torch.equal(other_test, x_test)


def test_train_test_split_errors():
    with pytest.raises(ValueError, match=r"test_fraction must lie in \(0, 1\)"):
        train_test_split(torch.rand(10, 2), test_fraction=1.0)
    with pytest.raises(ValueError, match="x has 10 rows but y has 9"):
        train_test_split(torch.rand(10, 2), torch.arange(9))
    with pytest.raises(ValueError, match="empty train or test part"):
        train_test_split(torch.rand(3, 2), test_fraction=0.1)


def test_split_rows_is_the_new_name_and_train_test_split_its_alias():
    from ppl_lvm import data, split_rows
    x = torch.arange(40.0).reshape(20, 2)
    assert data.train_test_split is split_rows
    new_train, new_test = split_rows(x, test_fraction=0.25, seed=1)
    old_train, old_test = data.train_test_split(x, test_fraction=0.25, seed=1)
    assert torch.equal(new_train, old_train) and torch.equal(new_test, old_test)
    assert len(new_test) == 5
