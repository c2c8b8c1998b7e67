"""A trained run on disk: its config, weights, data split and metrics, so later commands
(`evaluate`, `gaps`, `complete`) rebuild exactly what `train` fitted."""
import hashlib
import json
import os
import re
import time
import warnings
from pathlib import Path

import pyro.poutine
import torch
from pyro.poutine.subsample_messenger import _Subsample

from ppl_lvm import atomic, checkpoint, program
from ppl_lvm import data as datasets
from ppl_lvm import experiment
from ppl_lvm.models.missing import MaskedVAE
from ppl_lvm.models.mog import MixtureOfGaussians
from ppl_lvm.models.vae import VAE

MODELS = {"vae": VAE, "masked-vae": MaskedVAE, "ppca": experiment.ppca, "mog": MixtureOfGaussians}
CONFIG_NAME, WEIGHTS_NAME, METRICS_NAME = "config.json", "model.pt", "metrics.json"


def run_data(data_config, device="cpu"):
    """The run's (x_train, x_test) [N, D], rebuilt from its data config (same split, same binarization).

    Bernoulli runs keep x_train in [0, 1] (binarized afresh per minibatch by ``fit``'s transform)
    and binarize x_test once, stochastically, with a fixed seed.
    """
    x, _ = datasets.load_dataset(data_config["name"], path=data_config.get("path"), device=device)
    x_train, x_test = datasets.split_rows(
        x, test_fraction=data_config["test_fraction"], seed=data_config["split_seed"])
    if data_config.get("binarize"):
        x_test = datasets.binarize(x_test, method="stochastic", seed=data_config["split_seed"])
    return x_train, x_test


LOCK_NAME = ".ppl-lvm.lock"  # the pid of the run writing the folder
GUARD_NAME = ".ppl-lvm.guard"  # what the operating system locks
# what `train` writes (and `evaluate`, `gaps`, `complete` add): --overwrite deletes these, and
# nothing else a user keeps in the folder
IDENTITY_NAME = "identity.json"  # what the run is: written at its start, checked on --resume
RUN_PATTERNS = (CONFIG_NAME, WEIGHTS_NAME, IDENTITY_NAME, METRICS_NAME, "checkpoint.pt", "local-rank*-of-*.pt",
                "reconstructions.png", "samples.png", "training_curve.png", "completions_*.png",
                "evaluate_*.json", "gaps.json", "metrics.jsonl", "user_model.py", "bdmc_*.json")


# the names the package writes, exactly (a user's "evaluate_notes.json" or "my.png" is theirs)
_RUN_NAMES = re.compile(
    r"(config\.json|model\.pt|metrics\.json|metrics\.jsonl|identity\.json|checkpoint\.pt"
    r"|local-rank\d+-of-\d+\.pt|reconstructions\.png|samples\.png|training_curve\.png"
    r"|completions_[a-z_]+\.png|evaluate_exact\.json|evaluate_[a-z]+_K\d+(_T\d+)?\.json|gaps\.json"
    r"|user_model\.py|bdmc_T\d+_K\d+\.json)")


def is_run_file(path):
    """Whether ``path`` is a regular file (not a link, not a folder) under a name the package
    writes into a run folder: what --overwrite deletes."""
    path = Path(path)
    return (bool(_RUN_NAMES.fullmatch(path.name)) and path.is_file()
            and not path.is_symlink())


class RunFolderError(ValueError):
    """A run folder that cannot be used as asked: it holds a run, is in use, or is unreadable."""


def holds_run(out_dir):
    """Whether ``out_dir`` holds (part of) a trained run: weights, config or a checkpoint."""
    out_dir = Path(out_dir)
    return any((out_dir / name).exists() for name in (CONFIG_NAME, WEIGHTS_NAME, "checkpoint.pt"))


def prepare_run_folder(out_dir, resume=False, overwrite=False):
    """Check that ``train`` may write into ``out_dir`` and create it.

    A folder holding a run is refused unless ``resume`` (continue it) or ``overwrite`` (its run's
    files are deleted first, so the folder never mixes two runs).
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise RunFolderError(f"--out {out_dir} is a file, not a folder")
    if resume and overwrite:
        raise RunFolderError("--resume and --overwrite contradict each other: pick one")
    if not resume and holds_run(out_dir):
        if not overwrite:
            raise RunFolderError(f"{out_dir} already holds a trained run: pass --resume to continue "
                                 "it or --overwrite to replace it (or choose another --out)")
        for path in out_dir.iterdir():
            if is_run_file(path):
                path.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    # a run killed inside a write leaves its temporary file; the lock says no one is writing now
    for path in atomic.temp_files(out_dir):
        path.unlink()


class RunLock:
    """Holds the run folder while a run writes it, so that a second run into it stops naming the
    first one's pid.

    The lock is ``filelock``'s (flock on POSIX, msvcrt on Windows) on ``out_dir/.ppl-lvm.guard``:
    the operating system drops it when the process dies however it dies, so a run left by a dead
    process is taken over (no guessing from pids, which get reused). The holder writes its pid
    into ``out_dir/.ppl-lvm.lock`` and removes it when done; the guard file stays (empty).
    """

    def __init__(self, out_dir):
        self.path = Path(out_dir) / LOCK_NAME
        self.guard = None

    def __enter__(self):
        import filelock

        if self.path.parent.exists() and not self.path.parent.is_dir():
            raise RunFolderError(f"{self.path.parent} is a file, not a run folder")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for path in (self.path, self.path.parent / GUARD_NAME):
            if path.is_symlink():  # never through a link: it would write outside the folder
                raise RunFolderError(f"the lock file {path} is a symbolic link: ppl-lvm never "
                                     "writes through links; remove it")
        guard = filelock.FileLock(str(self.path.parent / GUARD_NAME), timeout=0)
        try:
            guard.acquire()
        except filelock.Timeout:
            raise RunFolderError(
                f"{self.path.parent} is in use by another run (pid {_read_pid(self.path)}, lock "
                f"file {self.path}); wait for it to finish or stop it, or choose another --out"
            ) from None
        except PermissionError as error:
            raise RunFolderError(f"cannot write into {self.path.parent} ({error.strerror}): is "
                                 "it read-only? choose another --out") from error
        try:
            atomic.write_text(self.path, f"{os.getpid()}\n")
        except OSError as error:
            guard.release()
            reason = getattr(error.__cause__, "strerror", None) or error.strerror or error
            raise RunFolderError(f"cannot write into {self.path.parent} ({reason}): is it "
                                 "read-only? choose another --out") from error
        self.guard = guard
        return self

    def __exit__(self, *exc):
        if self.guard is not None:
            try:
                self.path.unlink()  # while still holding the guard
            except FileNotFoundError:
                pass
            self.guard.release()
            self.guard = None


def run_stamp(run_dir):
    """Which run a folder holds now: model.pt's inode, size and mtime (an atomic replace, as
    `train --overwrite` or `--resume` write it, gives a new inode). None without model.pt."""
    try:
        st = os.stat(Path(run_dir) / WEIGHTS_NAME)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def write_into_run(run_dir, stamp, write):
    """Call ``write()`` (which writes a command's result into ``run_dir``) under the run's lock,
    and only if the folder still holds the run the command loaded (``stamp``): a `train
    --overwrite` that replaced it meanwhile must not receive the old run's results. Temporary
    files a killed command left are removed first (the lock says no one is writing)."""
    with RunLock(run_dir):
        if run_stamp(run_dir) != stamp:
            raise RunFolderError(f"{run_dir} was replaced while this command ran (by `train "
                                 "--overwrite` or `--resume`?): its results belong to the old "
                                 "run and were not written; run the command again")
        for path in atomic.temp_files(run_dir):
            path.unlink()
        return write()


def _read_pid(path):
    for _ in range(3):  # its owner may be between taking the guard and writing its pid
        try:
            text = path.read_text(errors="replace").strip()
        except OSError:
            text = ""
        if text:
            return text
        time.sleep(0.1)
    return "unknown"


# ----------------------------------------------------------------------------------------------
# trusting a run's code: a run folder holding user_model.py is code. Runs this user trained are
# trusted through a local record of their code's SHA-256 (like a notebook's signature); any other
# run's code runs only with --trust-code (trust_code=True), which then records it too.

TRUST_ENV = "PPL_LVM_TRUST_FILE"


def trust_file():
    """The user's record of trusted model code: $PPL_LVM_TRUST_FILE, else
    $XDG_CACHE_HOME/ppl_lvm/trusted_code.txt (~/.cache/ppl_lvm/trusted_code.txt)."""
    if os.environ.get(TRUST_ENV):
        return Path(os.environ[TRUST_ENV])
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "ppl_lvm" / "trusted_code.txt"


def code_hash(source):
    return hashlib.sha256(source).hexdigest()


def trust(source):
    """Record ``source`` (a model file's bytes) as trusted by this user."""
    path = trust_file()
    if is_trusted(source):
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, f"{code_hash(source)}\n".encode())
        finally:
            os.close(fd)
    except OSError as error:
        warnings.warn(f"could not record the run's code as trusted in {path} ({error}); "
                      "evaluating the run later will need --trust-code")


def is_trusted(source):
    try:
        return code_hash(source) in trust_file().read_text().split()
    except (OSError, UnicodeDecodeError):
        return False


def read_run_code(run_dir, trust_code=False):
    """The bytes of ``run_dir/user_model.py`` once they may run: never through a link, and only
    when this user trained the run here or ``trust_code`` says so."""
    path = Path(run_dir) / experiment.USER_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} not found: the run was trained from a model file and "
                                "needs its copy") from None
    except OSError as error:
        raise RunFolderError(f"{path} is a symbolic link (or unreadable: {error.strerror}): a "
                             "run's code is read only from the run folder itself") from error
    with os.fdopen(fd, "rb") as file:
        source = file.read()
    if not is_trusted(source):
        if not trust_code:
            raise RunFolderError(
                f"{path} is code that this user did not train here (its SHA-256 "
                f"{code_hash(source)[:12]}... is not in {trust_file()}): read it, then pass "
                "--trust-code to run it")
        trust(source)
    return source


class _AtTheirCentres(pyro.poutine.messenger.Messenger):
    """Sets every latent sample site to its distribution's mode or mean (no random draw), so that
    a trace depends only on the program, its parameters and the rows: the same on every device up
    to float error."""

    def _pyro_sample(self, msg):
        fn = msg["fn"]
        if msg["is_observed"] or msg["value"] is not None or isinstance(fn, _Subsample):
            return
        for name in ("mode", "mean"):
            try:
                value = getattr(fn, name)
            except (NotImplementedError, AttributeError, RuntimeError, ValueError):
                continue
            if torch.is_tensor(value) and bool(torch.isfinite(value).all()):
                break
        else:
            raise ValueError(f"sample site {msg['name']!r} has no finite mode or mean")
        msg["value"] = value.expand(fn.shape()) if value.shape != fn.shape() else value
        msg["done"] = True


FINGERPRINT_VERSION = 2


def output_fingerprint(module, rows):
    """What a rebuilt model must reproduce: the mean of every sample site's distribution (the
    decoder's outputs) in ``module.model``'s trace on ``rows``, with every latent site at its
    distribution's mode or mean and the networks in eval mode (no random draw, so the numbers
    are the same on every device up to float error). A model whose ``build`` draws random values, rebuilt without the run's seed,
    gives other numbers. None when the model cannot be run on the rows alone."""
    rows = rows[:3]
    try:
        with torch.no_grad(), program.evaluation_mode(module.model), _AtTheirCentres():
            trace = pyro.poutine.trace(module.model).get_trace(rows)
            means = []
            for site in trace.nodes.values():
                if site["type"] != "sample":
                    continue
                try:
                    mean = site["fn"].mean
                except (NotImplementedError, AttributeError, RuntimeError):
                    mean = site["value"]
                means.append(float(torch.as_tensor(mean).double().sum()))
    except Exception:  # e.g. a model that needs more arguments: nothing to check
        return None
    return {"rows": rows.detach().cpu(), "site_means": means, "device": rows.device.type,
            "version": FINGERPRINT_VERSION}


def check_fingerprint(module, fingerprint, path, device):
    """Refuse a rebuilt model whose outputs differ from those stored at train time (on any
    device: the fingerprint draws nothing)."""
    if not fingerprint:
        return
    if fingerprint.get("version", 1) < FINGERPRINT_VERSION:
        return  # a fingerprint that drew its latents on its device: not comparable
    now = output_fingerprint(module, fingerprint["rows"].to(device))
    if now is None:
        return
    saved = fingerprint.get("site_means", [])
    close = len(now["site_means"]) == len(saved) and all(
        abs(a - b) <= 1e-3 + 1e-4 * abs(b) for a, b in zip(now["site_means"], saved))
    if not close:
        raise RunFolderError(
            f"{path}: the rebuilt model does not reproduce its training-time outputs (its sample "
            f"sites' means {[round(v, 3) for v in now['site_means']]}, not "
            f"{[round(v, 3) for v in saved]}, on 3 stored rows): its build() draws values that "
            "the weights do not hold, or its code changed")


def save_run(out_dir, model_name, module, config, metrics=None, fingerprint=None):
    """Write model.pt (weights, constructor config, and the run's config and metrics), then
    config.json and metrics.json into ``out_dir``, each atomically.

    model.pt is the run: if the process dies between the files, ``load_run`` reads the config from
    model.pt and rewrites the JSON copies, so every command sees the old run or the new one.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    module_config = module.config() if callable(getattr(module, "config", None)) else {}
    config = {**config, "model": model_name, "model_config": module_config}
    saved = {"config": module_config, "state_dict": state_module(module).state_dict(),
             "run": config, "metrics": metrics}
    if fingerprint is not None:
        saved["fingerprint"] = fingerprint
    atomic.torch_save(saved, out_dir / WEIGHTS_NAME)
    atomic.write_json(out_dir / CONFIG_NAME, config)
    if metrics is not None:
        atomic.write_json(out_dir / METRICS_NAME, metrics)


def _read_config(path):
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise RunFolderError(f"{path} is not valid JSON ({error}): it was truncated or is not from "
                             "`ppl-lvm train`; retrain into the folder with --overwrite") from error
    if not isinstance(config, dict):
        raise RunFolderError(f"{path} holds a {type(config).__name__}, not a run's config")
    return config


def load_run(run_dir, device="cpu", trust_code=False):
    """Rebuild a trained run: returns (module, config). Clear errors for a missing or bad folder.

    A run of a user's model file runs its copy ``user_model.py`` only when this user trained it
    here (see ``trust_file``) or ``trust_code`` is True."""
    run_dir = Path(run_dir)
    config_path, weights_path = run_dir / CONFIG_NAME, run_dir / WEIGHTS_NAME
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} not found: is it a folder written by `ppl-lvm train`?")
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path} not found: is {run_dir} a folder written by "
                                "`ppl-lvm train` (and did it finish)?")
    try:
        saved = torch.load(weights_path, map_location=device, weights_only=True)
    except Exception as error:  # EOFError, RuntimeError (zip), UnpicklingError, ...
        raise checkpoint.unreadable(weights_path, error, "weights written by `ppl-lvm train`",
                                    "retrain into the folder with --overwrite") from error
    if not isinstance(saved, dict) or "config" not in saved or "state_dict" not in saved:
        found = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
        raise checkpoint.unreadable(weights_path, KeyError(f"it holds {found}"),
                                    "weights written by `ppl-lvm train`",
                                    "retrain into the folder with --overwrite")
    config = saved.get("run")
    if config is None:  # written before model.pt carried its run's config
        if not config_path.is_file():
            raise FileNotFoundError(f"{config_path} not found: is {run_dir} a folder written by "
                                    "`ppl-lvm train`?")
        config = _read_config(config_path)
    elif _read_json_or_none(config_path) != config or (
            saved.get("metrics") is not None
            and _read_json_or_none(run_dir / METRICS_NAME) != saved["metrics"]):
        _repair(run_dir, config, saved.get("metrics"))
    user = config.get("model_file")
    if config.get("model") not in MODELS and not user:
        raise RunFolderError(f"{config_path} names unknown model {config.get('model')!r}; "
                             f"known: {sorted(MODELS)}")
    try:
        if user:  # the copy of the user's file kept in the run folder
            source = read_run_code(run_dir, trust_code)
            spec = f"{run_dir / experiment.USER_FILE}:{config.get('builder', 'build')}"
            # built under the run's seed, as `train` built it: a build() that draws random
            # values (a fixed random projection, say) draws the same ones
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.get("cli", {}).get("seed", 0))
                module = experiment.user_module(spec, config["data_dim"],
                                                config.get("options", {}), source=source)
        else:
            module = MODELS[config["model"]](**saved["config"])
        holder = state_module(module).to(device)
        holder.load_state_dict(saved["state_dict"])
    except (TypeError, RuntimeError, KeyError) as error:
        raise RunFolderError(f"{weights_path} does not fit its model {config['model']!r} "
                             f"({str(error).splitlines()[0]}); retrain with --overwrite") from error
    check_fingerprint(module, saved.get("fingerprint"), weights_path, device)
    return module, config


def state_module(obj):
    """The nn.Module whose state is the run's weights: ``obj`` itself, or for a plain object (a
    user's model file may return one) its nn.Module attributes gathered in a ModuleDict."""
    if isinstance(obj, torch.nn.Module):
        return obj
    parts = {name: value for name, value in vars(obj).items()
             if isinstance(value, torch.nn.Module)}
    return torch.nn.ModuleDict(parts)


def _read_json_or_none(path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def _repair(run_dir, config, metrics):
    """The process died after writing model.pt and before its JSON copies (or they were damaged):
    write them again from model.pt, saying so (a read-only folder keeps its stale copies;
    model.pt is what is read)."""
    warnings.warn(f"{run_dir / CONFIG_NAME} or {run_dir / METRICS_NAME} does not match "
                  f"{run_dir / WEIGHTS_NAME} (the run was interrupted while saving, or they were "
                  "edited): rewriting them from model.pt, which holds the run")
    try:
        atomic.write_json(run_dir / CONFIG_NAME, config)
        if metrics is not None:
            atomic.write_json(run_dir / METRICS_NAME, metrics)
    except OSError:
        pass
