"""Bad inputs, one table: each through the API (fit, loaders, binarize, log_marginal, ...) or the CLI
must raise (or exit 2 with one line) naming the argument, file or site at fault; none may return
NaN or a number.
"""
import gzip

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from ppl_lvm import data
from ppl_lvm.checkpoint import CheckpointError, DivergenceError
from ppl_lvm.cli import main
from ppl_lvm.estimators import log_marginal
from ppl_lvm.models import missing
from ppl_lvm.models.vae import VAE
from ppl_lvm.train import fit

D = 16
X = torch.bernoulli(torch.full((64, D), 0.3), generator=torch.Generator().manual_seed(0))
TINY = ["--data", "digits", "--z-dim", "2", "--hidden-dim", "8", "--batch-size", "512",
        "--eval-every", "1", "--quiet"]


def vae(likelihood="bernoulli"):
    torch.manual_seed(0)
    return VAE(D, z_dim=2, hidden_dim=8, likelihood=likelihood)


def fit_vae(x=X, likelihood="bernoulli", **options):
    model = vae(likelihood)
    return fit(model.model, model.guide, x, **{"epochs": 1, "batch_size": 32, "progress": False,
                                               **options})


def sqrt_model(x):
    loc = pyro.param("loc", torch.zeros(1))  # its gradient at 0 is NaN
    with pyro.plate("data", len(x)):
        pyro.sample("x", dist.Normal(loc.abs().sqrt(), 1.0), obs=x)


def no_guide(x):
    pass


def idx_bytes(magic, sizes, payload=b""):
    return (magic.to_bytes(4, "big") + b"".join(s.to_bytes(4, "big") for s in sizes) + payload)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Bad files, by name."""
    root = tmp_path_factory.mktemp("bad")
    images = np.zeros((4, 4, 4), np.uint8)
    labels = np.zeros(4, np.uint8)
    paths = {}

    def npz(name, **arrays):
        path = root / f"{name}.npz"
        np.savez(path, **arrays)
        paths[name] = path

    good = dict(x_train=images, y_train=labels, x_test=images, y_test=labels)
    npz("good", **good)
    npz("no_test", x_train=images, y_train=labels)
    npz("float_255", **{**good, "x_train": images.astype(np.float32) + 255})
    npz("nan", **{**good, "x_train": np.full((4, 4, 4), np.nan, np.float32)})
    npz("int_300", **{**good, "x_train": np.full((4, 4, 4), 300, np.int16)})
    npz("float_labels", **{**good, "y_train": labels.astype(np.float32)})
    npz("count_mismatch", **{**good, "y_train": labels[:3]})
    npz("flat_images", **{**good, "x_train": np.zeros(4, np.uint8)})
    npz("sizes_differ", **{**good, "x_test": np.zeros((4, 5, 5), np.uint8)})
    npz("strings", **{**good, "x_train": np.array([["a"] * 4] * 4)})
    path = root / "objects.npz"
    np.savez(path, **{**good, "x_train": np.array([np.zeros(2), np.zeros(3)], dtype=object)})
    paths["objects"] = path
    path = root / "truncated.npz"
    path.write_bytes(paths["good"].read_bytes()[:200])
    paths["truncated"] = path
    path = root / "text.npz"
    path.write_text("x_train,y_train\n1,2\n")
    paths["text"] = path
    path = root / "empty.npz"
    path.write_bytes(b"")
    paths["empty"] = path
    path = root / "single.npz"
    with open(path, "wb") as handle:
        np.save(handle, images)
    paths["single"] = path
    path = root / "notes.txt"
    path.write_text("hello")
    paths["txt"] = path

    def idx_folder(name, train_images):
        folder = root / name
        folder.mkdir()
        (folder / "train-images-idx3-ubyte").write_bytes(train_images)
        (folder / "train-labels-idx1-ubyte").write_bytes(idx_bytes(0x801, [4], bytes(4)))
        paths[name] = folder

    idx_folder("wrong_magic", idx_bytes(0x803 + 0x100, [4, 4, 4], bytes(64)))
    idx_folder("truncated_idx", idx_bytes(0x803, [4, 4, 4], bytes(10)))
    idx_folder("overflow_idx", idx_bytes(0x803, [0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF], bytes(10)))
    idx_folder("short_header", idx_bytes(0x803, [4]))
    idx_folder("bad_gzip", b"\x1f\x8b" + b"garbage" * 10)
    folder = root / "no_labels"
    folder.mkdir()
    (folder / "train-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(idx_bytes(0x803, [4, 4, 4], bytes(64))))
    paths["no_labels"] = folder
    for name, code in [("build_raises", "def build(data_dim, **options):\n"
                                        "    raise ValueError('boom')\n"),
                       ("import_raises", "undefined_name + 1\n"),
                       ("syntax_error", "def build(:\n"),
                       ("returns_none", "def build(data_dim, **options):\n    return None\n"),
                       ("int_option", "def build(data_dim, z_dim=2):\n    return int(z_dim)\n")]:
        paths[name] = root / f"{name}.py"
        paths[name].write_text(code)
    paths["empty_folder"] = root / "empty_folder"
    paths["empty_folder"].mkdir()
    paths["a_file"] = paths["txt"]
    paths["root"] = root
    return paths


def resume_from(tmp_path, **options):
    fit_vae(checkpoint_dir=tmp_path)
    return fit_vae(checkpoint_dir=tmp_path, resume=True, **{"epochs": 2, **options})


def damaged_checkpoint(tmp_path, damage):
    fit_vae(checkpoint_dir=tmp_path)
    path = tmp_path / "checkpoint.pt"
    if damage == "foreign":
        torch.save([1, 2, 3], path)
    else:
        path.write_bytes(path.read_bytes()[:{"empty": 0, "truncated": 300}[damage]])
    return fit_vae(checkpoint_dir=tmp_path, resume=True, epochs=2)


def mnist(files, name, **options):
    return data.load_mnist(files[name], **options)


# (id, call(files, tmp_path), error type, words the message must hold ({name}: that file's path))
API = [
    # fit
    ("fit epochs<0", lambda f, t: fit_vae(epochs=-1), ValueError, ["epochs", "-1"]),
    ("fit batch_size=0", lambda f, t: fit_vae(batch_size=0), ValueError, ["batch_size"]),
    ("fit checkpoint_every=0", lambda f, t: fit_vae(checkpoint_every=0), ValueError,
     ["checkpoint_every"]),
    ("fit eval_every=0", lambda f, t: fit_vae(eval_data=X, eval_every=0), ValueError,
     ["eval_every", "0"]),
    ("fit inner_steps<0", lambda f, t: fit_vae(inner_steps=-2), ValueError, ["inner_steps"]),
    ("fit validate=bad", lambda f, t: fit_vae(validate="sometimes"), ValueError, ["validate"]),
    ("fit resume without dir", lambda f, t: fit_vae(resume=True), ValueError,
     ["resume", "checkpoint_dir"]),
    ("fit resume empty dir", lambda f, t: fit_vae(resume=True, checkpoint_dir=t),
     FileNotFoundError, ["checkpoint.pt"]),
    ("fit data list", lambda f, t: fit_vae(x=[[0.0] * D]), TypeError, ["data"]),
    ("fit data empty", lambda f, t: fit_vae(x=torch.zeros(0, D)), ValueError, ["empty"]),
    ("fit data NaN", lambda f, t: fit_vae(x=torch.where(X > 0, float("nan"), X)), ValueError,
     ["NaN", "rows"]),
    ("fit data N mismatch", lambda f, t: fit_vae(x=(X, X[:3])), ValueError, ["first dim"]),
    ("fit data scalar", lambda f, t: fit_vae(x=torch.tensor(1.0)), ValueError, ["data", "first dim"]),
    ("fit lr 1e6 blows up", lambda f, t: fit_vae(lr=1e6, batch_size=8), DivergenceError,
     ["blew up", "step 2", "learning rate"]),
    ("fit gaussian 0..255", lambda f, t: fit_vae(x=X * 255, likelihood="gaussian"), ValueError,
     ["site 'x'", "1/255"]),
    ("fit bernoulli 0..255", lambda f, t: fit_vae(x=X * 255), ValueError, ["site 'x'"]),
    ("fit NaN under validation", lambda f, t: fit(sqrt_model, no_guide, torch.randn(8), epochs=1,
                                                  batch_size=4, progress=False, validate=True),
     DivergenceError, ["loss became nan at step 2", "no checkpoint_dir"]),
    ("fit NaN param at the end", lambda f, t: fit(sqrt_model, no_guide, torch.randn(8), epochs=1,
                                                  batch_size=8, progress=False, validate=False),
     DivergenceError, ["parameter became non-finite by step 1"]),
    ("fit resume other data", lambda f, t: resume_from(t, x=1 - X), CheckpointError,
     ["checkpoint.pt", "other data"]),
    ("fit resume other lr", lambda f, t: resume_from(t, lr=0.5), CheckpointError,
     ["checkpoint.pt", "lr 0.001, not 0.5"]),
    ("fit resume other batch_size", lambda f, t: resume_from(t, batch_size=16), ValueError,
     ["checkpoint.pt", "batch_size"]),
    ("fit resume other seed", lambda f, t: resume_from(t, seed=3), ValueError,
     ["checkpoint.pt", "seed"]),
    ("fit resume empty checkpoint", lambda f, t: damaged_checkpoint(t, "empty"), CheckpointError,
     ["checkpoint.pt", "it is empty"]),
    ("fit resume truncated checkpoint", lambda f, t: damaged_checkpoint(t, "truncated"),
     CheckpointError, ["checkpoint.pt", "truncated"]),
    ("fit resume foreign checkpoint", lambda f, t: damaged_checkpoint(t, "foreign"),
     CheckpointError, ["checkpoint.pt", "it holds list"]),
    # models
    ("VAE likelihood", lambda f, t: VAE(D, likelihood="poisson"), ValueError, ["'poisson'"]),
    # load_mnist and friends
    ("mnist no such path", lambda f, t: data.load_mnist(f["root"] / "nope"), FileNotFoundError,
     ["{root}"]),
    ("mnist not npz", lambda f, t: mnist(f, "txt"), ValueError, ["{txt}", ".npz"]),
    ("mnist split", lambda f, t: data.load_mnist(f["good"], split="dev"), ValueError,
     ["split", "'dev'"]),
    ("mnist dtype", lambda f, t: data.load_mnist(f["good"], dtype=torch.int64), ValueError,
     ["dtype"]),
    ("mnist missing npz key", lambda f, t: mnist(f, "no_test"), ValueError, ["{no_test}", "x_test"]),
    ("mnist float 255", lambda f, t: mnist(f, "float_255"), ValueError, ["{float_255}", "[0, 1]"]),
    ("mnist NaN", lambda f, t: mnist(f, "nan"), ValueError, ["{nan}", "NaN"]),
    ("mnist int 300", lambda f, t: mnist(f, "int_300"), ValueError, ["{int_300}", "0..255"]),
    ("mnist float labels", lambda f, t: mnist(f, "float_labels"), ValueError,
     ["{float_labels}", "labels"]),
    ("mnist count mismatch", lambda f, t: mnist(f, "count_mismatch"), ValueError,
     ["{count_mismatch}", "labels"]),
    ("mnist 1-D images", lambda f, t: mnist(f, "flat_images"), ValueError, ["{flat_images}", "shape"]),
    ("mnist sizes differ", lambda f, t: mnist(f, "sizes_differ"), ValueError,
     ["{sizes_differ}", "differ"]),
    ("mnist string images", lambda f, t: mnist(f, "strings"), ValueError, ["{strings}", "dtype"]),
    ("mnist object arrays", lambda f, t: mnist(f, "objects"), ValueError, ["{objects}", "object"]),
    ("mnist truncated npz", lambda f, t: mnist(f, "truncated"), ValueError,
     ["{truncated}", "truncated"]),
    ("mnist text named npz", lambda f, t: mnist(f, "text"), ValueError, ["{text}", "not a readable"]),
    ("mnist empty npz", lambda f, t: mnist(f, "empty"), ValueError, ["{empty}", "not a readable"]),
    ("mnist npy named npz", lambda f, t: mnist(f, "single"), ValueError, ["{single}", ".npy"]),
    ("idx wrong magic", lambda f, t: mnist(f, "wrong_magic", split="train"), ValueError,
     ["{wrong_magic}/train-images-idx3-ubyte", "magic"]),
    ("idx truncated", lambda f, t: mnist(f, "truncated_idx", split="train"), ValueError,
     ["{truncated_idx}/train-images-idx3-ubyte", "truncated"]),
    ("idx overflowing sizes", lambda f, t: mnist(f, "overflow_idx", split="train"), ValueError,
     ["{overflow_idx}/train-images-idx3-ubyte", "4294967295"]),
    ("idx short header", lambda f, t: mnist(f, "short_header", split="train"), ValueError,
     ["{short_header}/train-images-idx3-ubyte", "header"]),
    ("idx bad gzip", lambda f, t: mnist(f, "bad_gzip", split="train"), ValueError,
     ["{bad_gzip}/train-images-idx3-ubyte", "gzip"]),
    ("idx labels missing", lambda f, t: mnist(f, "no_labels", split="train"), FileNotFoundError,
     ["train-labels-idx1-ubyte", "{no_labels}"]),
    ("idx empty folder", lambda f, t: mnist(f, "empty_folder", split="test"), FileNotFoundError,
     ["t10k-images-idx3-ubyte", "{empty_folder}"]),
    ("dataset name", lambda f, t: data.load_dataset("cifar"), ValueError, ["'cifar'"]),
    ("digits with path", lambda f, t: data.load_dataset("digits", path=f["good"]), ValueError,
     ["digits", "path"]),
    # binarize, check_data, train_test_split
    ("binarize list", lambda f, t: data.binarize([0.5]), TypeError, ["x", "Tensor"]),
    ("binarize int", lambda f, t: data.binarize(torch.ones(2, 2, dtype=torch.long)), TypeError,
     ["x", "dtype"]),
    ("binarize NaN", lambda f, t: data.binarize(torch.tensor([float("nan")])), ValueError,
     ["x", "NaN"]),
    ("binarize 0..255", lambda f, t: data.binarize(X * 255), ValueError, ["x", "[0, 1]", "255"]),
    ("binarize method", lambda f, t: data.binarize(X, method="coin"), ValueError, ["'coin'"]),
    ("binarize empty", lambda f, t: data.binarize(torch.zeros(0)), ValueError, ["x", "empty"]),
    ("check_data 3-D", lambda f, t: data.check_data(X[None]), ValueError, ["x", "2-D"]),
    ("split fraction", lambda f, t: data.train_test_split(X, test_fraction=1.5), ValueError,
     ["test_fraction", "1.5"]),
    ("split y", lambda f, t: data.train_test_split(X, torch.zeros(3)), ValueError, ["y", "3"]),
    ("split empty part", lambda f, t: data.train_test_split(X[:2], test_fraction=0.1), ValueError,
     ["test_fraction", "empty"]),
    # log_marginal
    ("log_marginal method", lambda f, t: log_marginal(vae().model, vae().guide, X, method="magic"),
     ValueError, ["'magic'"]),
    ("log_marginal x list", lambda f, t: log_marginal(vae().model, vae().guide, X.tolist()),
     ValueError, ["x", "list"]),
    ("log_marginal x empty", lambda f, t: log_marginal(vae().model, vae().guide, X[:0]),
     ValueError, ["x", "rows"]),
    ("log_marginal x NaN", lambda f, t: log_marginal(vae().model, vae().guide, X * float("nan")),
     ValueError, ["x", "NaN"]),
    ("log_marginal K=0", lambda f, t: log_marginal(vae().model, vae().guide, X, num_samples=0),
     ValueError, ["num_samples", "0"]),
    ("log_marginal chunk_size", lambda f, t: log_marginal(vae().model, vae().guide, X,
                                                          chunk_size=-1),
     ValueError, ["chunk_size"]),
    ("log_marginal plate", lambda f, t: log_marginal(vae().model, vae().guide, X,
                                                     plate_name="rows"),
     ValueError, ["'rows'"]),
    ("log_marginal 0..255", lambda f, t: log_marginal(vae().model, vae().guide, X * 255,
                                                      num_samples=2),
     ValueError, ["site 'x'", "1/255"]),
    ("log_marginal no guide", lambda f, t: log_marginal(vae().model, None, X), ValueError,
     ["guide"]),
    # missing data
    ("mask name", lambda f, t: missing.make_mask("nope", 2, 16), ValueError, ["'nope'"]),
    ("mask rate", lambda f, t: missing.make_mask("mcar", 2, 16, rate=1.0), ValueError,
     ["rate", "1.0"]),
]


def guide_without_w(x):
    with pyro.plate("data", len(x)):
        pyro.sample("z", dist.Normal(0.0, 1.0))


def model_with_w(x):
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal((z + w).unsqueeze(-1).expand(len(x), D), 1.0).to_event(1),
                    obs=x)


def big_npz(root):
    """An .npz whose x_train declares 10^12 bytes (its header only: nothing is allocated)."""
    import io
    import zipfile

    path = root / "terabyte.npz"
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False,
                                                  "shape": (10 ** 6, 125_000)})
    labels = io.BytesIO()
    np.save(labels, np.zeros(3, np.uint8))
    with zipfile.ZipFile(path, "w") as archive:
        for part in ("train", "test"):
            archive.writestr(f"x_{part}.npy", header.getvalue())
            archive.writestr(f"y_{part}.npy", labels.getvalue())
    return path


def gzip_idx(root, name, sizes, payload_size):
    """A gzipped IDX images file declaring ``sizes`` and holding ``payload_size`` zero bytes,
    written in chunks (a bomb stays small on disk)."""
    import zlib

    folder = root / name
    folder.mkdir(exist_ok=True)
    deflate = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [deflate.compress(idx_bytes(0x803, sizes))]
    chunk = bytes(1 << 20)
    for _ in range(payload_size >> 20):
        parts.append(deflate.compress(chunk))
    parts.append(deflate.compress(bytes(payload_size % (1 << 20))))
    parts.append(deflate.flush())
    (folder / "train-images-idx3-ubyte.gz").write_bytes(b"".join(parts))
    (folder / "train-labels-idx1-ubyte").write_bytes(idx_bytes(0x801, [4], bytes(4)))
    return folder


API += [
    # fit: wrong types are named, never taken for another value (batch_size=True is not 1)
    *[(f"fit {name}={value!r}", (lambda name, value: lambda f, t: fit_vae(**{name: value}))(
        name, value), TypeError, [name, type(value).__name__])
      for name, value in [("epochs", 2.0), ("epochs", True), ("epochs", "2"),
                          ("batch_size", True), ("batch_size", 2.5), ("batch_size", "32"),
                          ("seed", 1.5), ("seed", "0"), ("seed", None), ("eval_every", True),
                          ("checkpoint_every", 1.5), ("inner_steps", 1.0)]],
    *[(f"fit lr={value!r}", (lambda value: lambda f, t: fit_vae(lr=value))(value), ValueError,
       ["lr", repr(value)]) for value in [0, 0.0, -1e-3, float("nan"), float("inf"), "0.1", True,
                                          None]],
    ("fit int data", lambda f, t: fit_vae(x=X.long()), ValueError, ["torch.int64", "x.float()"]),
    ("fit bool data", lambda f, t: fit_vae(x=X.bool()), ValueError, ["torch.bool", "x.float()"]),
    ("fit NaN labels", lambda f, t: fit(model_with_w, guide_without_w,
                                        (X, torch.full((len(X),), float("nan"))), epochs=1,
                                        progress=False), ValueError, ["data[1]", "NaN"]),
    ("fit eval_data width", lambda f, t: fit_vae(eval_data=X[:, :3]), ValueError,
     ["eval_data", "(64, 3)", "(64, 16)"]),
    ("fit eval_data parts", lambda f, t: fit_vae(eval_data=(X, X)), ValueError, ["eval_data"]),
    ("fit guide lacks a latent", lambda f, t: fit(model_with_w, guide_without_w, X, epochs=1,
                                                  progress=False), ValueError,
     ["guide", "'w'"]),
    # data files declaring more than the loaders will allocate
    ("npz declares a terabyte", lambda f, t: data.load_mnist(big_npz(t)), ValueError,
     ["terabyte.npz", "x_train", "1,000,000,000,000 bytes", "MAX_DATA_BYTES"]),
    ("idx gzip declares 4 GB", lambda f, t: data.load_mnist(
        gzip_idx(t, "declares", [100_000, 200, 200], 1 << 20), split="train"), ValueError,
     ["train-images-idx3-ubyte.gz", "4,000,000,016 bytes", "MAX_DATA_BYTES"]),
    ("idx gzip inflates past its header", lambda f, t: data.load_mnist(
        gzip_idx(t, "bomb", [4, 4, 4], 64 << 20), split="train"), ValueError,
     ["train-images-idx3-ubyte.gz", "overlong", "expected 80 bytes, got 81"]),
    *[(f"log_marginal {name}={value!r}", (lambda name, value: lambda f, t: log_marginal(
        vae().model, vae().guide, X, **{name: value}))(name, value), error, [name, repr(value)])
      for name, value, error in [("memory_bytes", -1, ValueError), ("memory_bytes", 0, ValueError),
                                 ("num_samples", float("inf"), ValueError),
                                 ("num_samples", "10", ValueError), ("seed", 1.5, TypeError),
                                 ("seed", "0", TypeError)]],
    # masks by name
    *[(f"parse_missing {text!r}", (lambda text: lambda f, t: __import__(
        "ppl_lvm.experiment").experiment.parse_missing(text, 2, 16))(text), ValueError,
       [repr(text)]) for text in ["top_half:3", "mcar:", "mcar", "mcar:x", "mcar:1.5", "mcar:-0.1",
                                  "blocks:2", "nope"]],
]


@pytest.mark.parametrize("call, error, words", [row[1:] for row in API], ids=[row[0] for row in API])
def test_api_bad_input(files, tmp_path, call, error, words):
    with pytest.raises(error) as caught:
        value = call(files, tmp_path)
        pytest.fail(f"returned {value!r} instead of raising")  # never a number, never NaN
    message = str(caught.value)
    for word in words:
        word = word.format(**{k: v for k, v in files.items()})
        assert word in message, f"{word!r} not in {message!r}"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "vae", "--out", str(run), *TINY, "--epochs", "1"]) == 0
    return run


CLI = [
    ("train epochs<0", ["train", "vae", "--out", "{out}", "--epochs", "-1"], ["--epochs"]),
    ("train batch-size 0", ["train", "vae", "--out", "{out}", "--batch-size", "0"],
     ["--batch-size", "must be >= 1"]),
    ("train lr 0", ["train", "vae", "--out", "{out}", "--lr", "0"], ["--lr", "must be > 0"]),
    ("train lr text", ["train", "vae", "--out", "{out}", "--lr", "fast"], ["--lr", "'fast'"]),
    ("train eval-every 0", ["train", "vae", "--out", "{out}", "--eval-every", "0"],
     ["--eval-every"]),
    ("train test-fraction", ["train", "vae", "--out", "{out}", "--test-fraction", "1.5"],
     ["--test-fraction"]),
    ("train model", ["train", "gan", "--out", "{out}"], ["'gan'"]),
    ("train data", ["train", "vae", "--out", "{out}", "--data", "cifar"], ["'cifar'"]),
    ("train data-path missing", ["train", "vae", "--out", "{out}", "--data-path", "{root}/nope"],
     ["{root}/nope"]),
    ("train data-path text npz", ["train", "vae", "--out", "{out}", "--data-path", "{text}"],
     ["{text}"]),
    ("train data-path objects", ["train", "vae", "--out", "{out}", "--data-path", "{objects}"],
     ["{objects}"]),
    ("train data-path overflow idx", ["train", "vae", "--out", "{out}", "--data-path",
                                      "{overflow_idx}"], ["train-images-idx3-ubyte"]),
    ("train digits with path", ["train", "vae", "--out", "{out}", "--data", "digits",
                                "--data-path", "{good}"], ["digits", "path"]),
    ("train out is a file", ["train", "vae", "--out", "{txt}", *TINY, "--epochs", "1"],
     ["{txt}", "is a file"]),
    ("train resume and overwrite", ["train", "vae", "--out", "{out}", *TINY, "--resume",
                                    "--overwrite"], ["--resume", "--overwrite"]),
    ("train resume nothing", ["train", "vae", "--out", "{out}", *TINY, "--resume"],
     ["checkpoint.pt"]),
    ("train over a run", ["train", "vae", "--out", "{run}", *TINY, "--epochs", "1"],
     ["{run}", "--resume", "--overwrite"]),
    ("train resume fewer epochs", ["train", "vae", "--out", "{run}", *TINY, "--epochs", "0",
                                   "--resume"], ["{run}/checkpoint.pt", "--epochs 1"]),
    ("train resume other lr", ["train", "vae", "--out", "{run}", *TINY, "--epochs", "2",
                               "--resume", "--lr", "0.1"], ["{run}", "--lr 0.001 -> 0.1"]),
    ("train device cuda", ["train", "vae", "--out", "{out}", "--device", "cuda"], ["cuda"]),
    ("evaluate no run", ["evaluate", "{root}/nope"], ["{root}/nope", "not found"]),
    ("evaluate not a run", ["evaluate", "{empty_folder}"], ["{empty_folder}/model.pt"]),
    ("evaluate K 0", ["evaluate", "{run}", "-K", "0"], ["-K", "must be >= 1"]),
    ("evaluate method", ["evaluate", "{run}", "--method", "magic"], ["'magic'"]),
    ("gaps local-lr", ["gaps", "{run}", "--local-lr", "-1"], ["--local-lr", "must be > 0"]),
    ("complete mask", ["complete", "{run}", "--mask", "nope"], ["--mask", "'nope'"]),
    ("complete rate", ["complete", "{run}", "--mask", "mcar", "--rate", "1", "--n", "2"],
     ["rate"]),
]


# every count and step size of every command, each bad value named with its option
COUNTS = {
    "train": ["--batch-size", "--z-dim", "--hidden-dim", "--semi-steps", "--num-particles",
              "--components", "--eval-every", "--checkpoint-every"],
    "evaluate": ["--num-samples", "--num-steps", "--n"],
    "gaps": ["--num-samples", "--n", "--elbo-samples", "--local-steps"],
    "compare": ["--num-samples", "--n", "--local-steps"],
    "bdmc": ["--n", "--num-steps", "--num-samples"],
    "complete": ["--n", "--samples", "--num-particles", "--num-steps", "--block-size"],
}
RATES = {"train": ["--lr", "--local-lr"], "gaps": ["--local-lr"]}


def command(name, *options):
    head = ["train", "vae", "--out", "{out}"] if name == "train" else [name, "{run}"]
    if name == "compare":
        head = ["compare", "{run}", "--out", "{out}/cmp.png"]
    return [*head, *options]


CLI += [
    *[(f"{name} {option} {value}", command(name, option, value), [option, words])
      for name, options in COUNTS.items() for option in options
      for value, words in [("0", "must be >= 1"), ("-3", "must be >= 1"), ("abc", "'abc'"),
                           ("1.5", "'1.5'"), (str(2 ** 70), "at most")]],
    *[(f"{name} {option} {value}", command(name, option, value), [option, words])
      for name, options in RATES.items() for option in options
      for value, words in [("0", "must be > 0"), ("-1", "must be > 0"), ("nan", "must be > 0"),
                           ("inf", "finite"), ("fast", "'fast'")]],
    *[(f"{name} {option} {value}", command(name, option, value), [option, f"'{value}'"])
      for name, option, value in [
          ("train", "--lr-schedule", "linear"), ("train", "--likelihood", "poisson"),
          ("train", "--guide", "neural"), ("train", "--objective", "rws"),
          ("train", "--covariance", "spherical"), ("train", "--mog-method", "gibbs"),
          ("train", "--device", "tpu"), ("evaluate", "--device", "tpu"),
          ("complete", "--method", "gibbs"), ("gaps", "--device", "gpu"),
          ("bdmc", "--device", "gpu"), ("compare", "--device", "gpu")]],
    # --option: one line naming the option (or build and the file)
    *[(f"train --option {value}", ["train", "vae", "--out", "{out}", *TINY, "--option", value],
       ["--option"]) for value in ["z_dim=3", "novalue", "=3", "3x=1", "z-dim=2"]],
    # --missing: rates are mcar's alone, and it needs one
    *[(f"train --missing {value}", ["train", "masked-vae", "--out", "{out}", *TINY, "--missing",
                                    value], ["--missing", repr(value)])
      for value in ["top_half:3", "mcar:", "mcar", "mcar:x", "mcar:1.5", "left_half:0.2"]],
    ("train --out ''", ["train", "vae", "--out", "", *TINY], ["--out ''"]),
    # a model file's own errors: one line naming the file, the function and the line
    ("model build raises", ["train", "{build_raises}:build", "--out", "{out}", *TINY],
     ["{build_raises}:2", "(in build)", "ValueError: boom"]),
    ("model import raises", ["train", "{import_raises}:build", "--out", "{out}", *TINY],
     ["{import_raises}", "failed to import (line 1)", "NameError"]),
    ("model syntax error", ["train", "{syntax_error}:build", "--out", "{out}", *TINY],
     ["{syntax_error}", "failed to import", "SyntaxError"]),
    ("model returns None", ["train", "{returns_none}:build", "--out", "{out}", *TINY],
     ["{returns_none}", "NoneType", "no model and guide"]),
    ("model no such builder", ["train", "{returns_none}:make", "--out", "{out}", *TINY],
     ["{returns_none}", "no function 'make'"]),
    *[(f"model option {value}", ["train", "{int_option}:build", "--out", "{out}", *TINY,
                                 "--option", value], words)
      for value, words in [("z_dim=nan", ["--option", "nan"]), ("z_dim=1e400", ["--option", "inf"]),
                           ("z_dim=[1,2]", ["{int_option}:2", "(in build)", "[1,2]"]),
                           ("z_dim='3'", ["{int_option}:2", "(in build)", "'3'"]),
                           ("colour=red", ["{int_option}", "colour", "--option"])]],
    ("evaluate a mixture by ais", ["evaluate", "{mog}", "--method", "ais"],
     ["{mog}", "mixture", "--method ais"]),
    ("bdmc on a mixture", ["bdmc", "{mog}", "--n", "1"], ["{mog}", "mixture"]),
    ("gaps on a mixture", ["gaps", "{mog}"], ["{mog}", "mixture"]),
    ("complete on a mixture", ["complete", "{mog}", "--n", "2"], ["{mog}", "mixture"]),
    ("bdmc on a Gaussian VAE", ["bdmc", "{gaussian}", "--n", "2", "-T", "2", "-K", "1"],
     ["{gaussian}", "Gaussian VAE"]),
    ("gaps on a local run", ["gaps", "{local}"], ["{local}", "--guide local"]),
    ("compare --out ''", ["compare", "{run}", "--out", ""], ["--out ''"]),
]


def config_file(root, name, text):
    path = root / f"{name}.toml"
    path.write_text(text + "\n")
    return path


# --config: a file's values meet the command line's types, ranges and choices
CONFIGS = [
    ("dreg string", 'dreg = "false"', ["dreg", "true or false"]),
    ("quiet number", "quiet = 1", ["quiet", "true or false"]),
    ("epochs text", 'epochs = "ten"', ["epochs", "'ten'"]),
    ("epochs float", "epochs = 2.5", ["epochs", "float"]),
    ("batch-size 0", "batch-size = 0", ["batch_size", "must be >= 1"]),
    ("batch-size bool", "batch-size = true", ["batch_size", "bool"]),
    ("lr negative", "lr = -1.0", ["lr", "must be > 0"]),
    ("lr nan", "lr = nan", ["lr", "must be > 0"]),
    ("lr list", "lr = [0.1]", ["lr", "list"]),
    ("guide choice", 'guide = "neural"', ["guide", "choose from"]),
    ("likelihood choice", 'likelihood = "poisson"', ["likelihood", "choose from"]),
    ("z-dim float", "z-dim = 2.5", ["z_dim", "2.5"]),
    ("z-dim huge", f"z-dim = {2 ** 40}", ["z_dim", "at most"]),
    ("option string", 'option = "a=1"', ["option", "list of strings"]),
    ("option numbers", "option = [1, 2]", ["option", "list of strings"]),
    ("seed text", 'seed = "zero"', ["seed", "'zero'"]),
    ("model choice", 'model = "gan"', ["model", "'gan'"]),
    ("out", 'out = "elsewhere"', ["'out'", "command line"]),
    ("overwrite", "overwrite = true", ["'overwrite'", "command line"]),
    ("resume", "resume = true", ["'resume'", "command line"]),
    ("unknown", "colour = 3", ["unknown", "colour"]),
    ("not TOML", "= = =", ["cannot be read"]),
    ("dict", "[section]\nkey = 1", ["section"]),
]
CLI += [(f"config {name}", ["train", "vae", "--out", "{out}", "--config", f"{{config_{i}}}"],
         ["--config", *words]) for i, (name, _, words) in enumerate(CONFIGS)]


@pytest.fixture(scope="module")
def other_runs(tmp_path_factory):
    """A mixture run and a per-datapoint run, for the commands that do not apply to them."""
    root = tmp_path_factory.mktemp("kinds")
    assert main(["train", "mog", "--out", str(root / "mog"), "--data", "digits",
                 "--components", "2", "--quiet"]) == 0
    assert main(["train", "vae", "--guide", "local", "--out", str(root / "local"), *TINY,
                 "--epochs", "1"]) == 0
    assert main(["train", "vae", "--likelihood", "gaussian", "--out", str(root / "gaussian"),
                 *TINY, "--epochs", "1"]) == 0
    configs = {f"config_{i}": config_file(root, f"c{i}", text)
               for i, (_, text, _) in enumerate(CONFIGS)}
    return {"mog": root / "mog", "local": root / "local", "gaussian": root / "gaussian",
            **configs}


@pytest.mark.parametrize("argv, words", [row[1:] for row in CLI], ids=[row[0] for row in CLI])
def test_cli_bad_input(files, trained, other_runs, tmp_path, capsys, argv, words):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    names = {**files, **other_runs, "out": tmp_path / "out", "run": trained}
    before = {p.name: p.read_bytes() for p in trained.iterdir()}
    assert main([a.format(**names) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ppl-lvm: error:") and len(err.splitlines()) == 1, err
    for word in words:
        assert word.format(**names) in err, f"{word!r} not in {err!r}"
    assert {p.name: p.read_bytes() for p in trained.iterdir()} == before


def test_the_table_is_long_enough():
    assert len(API) + len(CLI) >= 250


def test_integer_zero_one_images_stay_binary(tmp_path):
    path = tmp_path / "binary.npz"
    images = (np.arange(4 * 16).reshape(4, 4, 4) % 2).astype(np.uint8)
    np.savez(path, x_train=images, y_train=np.zeros(4, np.uint8), x_test=images,
             y_test=np.zeros(4, np.uint8))
    x, _ = data.load_mnist(path)
    assert x.max().item() == 1.0 and set(x.unique().tolist()) == {0.0, 1.0}
    grey = tmp_path / "grey.npz"
    np.savez(grey, x_train=images * 255, y_train=np.zeros(4, np.uint8), x_test=images * 255,
             y_test=np.zeros(4, np.uint8))
    assert torch.equal(data.load_mnist(grey)[0], x)


def test_a_relative_data_path_is_stored_absolute(tmp_path, monkeypatch, capsys):
    images = (np.random.default_rng(0).random((40, 4, 4)) * 255).astype(np.uint8)
    np.savez(tmp_path / "small.npz", x_train=images, y_train=np.zeros(40, np.uint8),
             x_test=images[:10], y_test=np.zeros(10, np.uint8))
    monkeypatch.chdir(tmp_path)
    assert main(["train", "vae", "--out", "run", "--data-path", "small.npz", *TINY[2:],
                 "--epochs", "1"]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["evaluate", str(tmp_path / "run"), "-K", "2", "--n", "4"]) == 0
    assert "held-out log p(x)" in capsys.readouterr().out


def test_complete_out_folder_prints_the_file_it_wrote(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "vae", "--out", str(run), *TINY, "--epochs", "1"]) == 0
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    options = ["--n", "2", "--samples", "1", "--method", "sir", "--num-particles", "4"]
    for out, written in [(pictures, pictures / "completions_top_half.png"),
                         (tmp_path / "grid", tmp_path / "grid.png")]:
        capsys.readouterr()
        assert main(["complete", str(run), "--out", str(out), *options]) == 0
        printed = capsys.readouterr().out
        assert printed.strip().endswith(f"wrote {written}") and written.is_file()
