"""The command line: `ppl-lvm train | evaluate | compare | gaps | bdmc | complete | demo` (or `python -m ppl_lvm`).

Bad names, paths and option values end in one line `ppl-lvm: error: ...`, never a traceback
(`--debug` shows it). Messages go through `logging` (logger "ppl_lvm"): results and what was
written where at level RESULT, progress at INFO (`--quiet` hides it and the bars, `--verbose` adds
DEBUG).
"""
import argparse
import dataclasses
import logging
import math
import os
import sys
import time
from pathlib import Path

import pyro
import torch

from ppl_lvm import data as datasets
from ppl_lvm import distributed as ddp
from ppl_lvm import atomic, plots, program, threads
from ppl_lvm import progress as bars
from ppl_lvm.checkpoint import check_epochs, load_checkpoint
from ppl_lvm import experiment
from ppl_lvm import runs
from ppl_lvm.runs import (RunLock, holds_run, load_run, prepare_run_folder, run_data, save_run,
                          state_module)
from ppl_lvm.train import CHECKPOINT_NAME, DivergenceError, fit
from ppl_lvm.models.vae import VAE


logger = logging.getLogger("ppl_lvm")
RESULT = 25  # between INFO and WARNING: results and files written, shown even with --quiet
logging.addLevelName(RESULT, "RESULT")


class CLIError(Exception):
    """An error for the user: printed as one line."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option's default in its help line (not for flags, nor where there is none), and
    examples kept as written."""

    def _get_help_string(self, action):
        if action.default in (None, False, argparse.SUPPRESS) or "%(default)" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise CLIError(f"{message} (see `{self.prog} --help`)")


MAX_COUNT = 2 ** 31 - 1  # no count (K, n, steps, sizes) beyond what a tensor index holds


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    if value > MAX_COUNT:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_COUNT:,}, got {value:,}")
    return value


def positive_float(text):
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be > 0 (and finite), got {value}")
    return value


def model_name(text):
    if experiment.is_builtin(text) or ".py" in text:
        return text
    raise argparse.ArgumentTypeError(
        f"invalid choice: {text!r} (choose from {', '.join(experiment.BUILTIN)} or give "
        "path/to/file.py:build)")


COMPILE_MODES = {"off": False, "on": True, "auto": "auto", "inductor": "inductor"}


# what `demo` fixes (the README's VAE on the bundled MNIST): not options of `demo`, so that a
# user who gives one is told so instead of having it ignored
DEMO_FIXED = ("data", "data_path", "guide", "semi_steps", "local_lr", "inner_steps", "inner_tol",
              "objective", "num_particles", "dreg", "missing", "components", "covariance",
              "mog_method", "option")


def add_train_options(parser, epochs, demo=False):
    fixed = {}

    def add(*flags, **kwargs):
        action = parser.add_argument(*flags, **kwargs)
        if demo and action.dest in DEMO_FIXED:  # recorded in the run's config, not offered
            parser._remove_action(action)
            for flag in action.option_strings:
                parser._option_string_actions.pop(flag, None)
            for group in parser._action_groups:
                if action in group._group_actions:
                    group._group_actions.remove(action)
            fixed[action.dest] = action.default

    add("--data", default="mnist", choices=sorted(datasets.DATASETS),
        help="bundled data set (mnist: 5,000 real MNIST digits; digits: sklearn 8x8)")
    add("--data-path", default=None,
        help="a folder of MNIST IDX files (gzipped or not) or an .npz, instead of the bundled set")
    add("--epochs", type=int, default=epochs,
        help=f"passes over the training rows (default {epochs or 50}; for mog the cap on EM "
             "iterations or SVI epochs, default fit_mixture's)")
    add("--batch-size", type=positive_int, default=128, help="rows per optimiser step")
    add("--lr", type=positive_float, default=1e-3, help="Adam's step size for θ (and λ)")
    add("--lr-schedule", default="constant", choices=["constant", "cosine", "exponential"],
        help="decay every step size to 1/100 by the last step (non-amortized SVI needs it to "
             "converge)")
    add_compile_option(add, "each SVI step")
    add("--z-dim", type=positive_int, default=20, help="size of the latent z")
    add("--hidden-dim", type=positive_int, default=400, help="hidden units of the MLPs")
    add("--likelihood", default="bernoulli", choices=["bernoulli", "gaussian"],
        help="p(x | z): Bernoulli (data binarized) or Gaussian")
    add("--guide", default="amortized", choices=list(experiment.GUIDE_KINDS),
        help="; ".join(f"{name}: {kind.help}" for name, kind in experiment.GUIDE_KINDS.items()))
    add("--semi-steps", type=positive_int, default=5,
        help="refinement steps of --guide semi-amortized")
    add("--local-lr", type=positive_float, default=1e-2, help="step size of the per-datapoint φ tables")
    add("--inner-steps", type=int, default=0,
        help="S > 0: the lecture's two-step procedure, S steps on the batch's φ_i then one on θ "
             "(with --guide local)")
    add("--inner-tol", type=float, default=None,
        help="stop a batch's inner loop once a step improves it by less than this fraction "
             "(--inner-steps is then a cap; default: no early stop)")
    add("--objective", default="elbo", choices=list(experiment.OBJECTIVES),
        help="the training loss: the ELBO or the importance-weighted bound IWAE-K")
    add("-K", "--num-particles", type=positive_int, default=1,
        help="samples per datapoint in the objective (IWAE's K)")
    add("--dreg", action="store_true", help="doubly-reparameterised gradients for --objective iwae")
    add("--missing", default=None,
        help="train with missing pixels (masked-vae): top_half, bottom_half, left_half, "
             "right_half, blocks or mcar:RATE")
    add("--components", type=positive_int, default=10, help="mog: number of mixture components")
    add("--covariance", default="diag", choices=["diag", "full", "tied"],
        help="mog: covariance of each component")
    add("--mog-method", default="em", choices=["em", "enum", "reinforce", "amortized"],
        help="mog: how the mixture is fitted (em: the exact posterior as q)")
    add("--option", action="append", default=[], metavar="KEY=VALUE",
        help="an option for a model file's build(data_dim, **options); repeat")
    add("--test-fraction", type=float, default=0.2, help="share of the rows held out")
    add("--eval-every", type=positive_int, default=5,
        help="held-out ELBO every N epochs (metrics.jsonl, the curve)")
    add("--checkpoint-every", type=positive_int, default=None,
        help="also checkpoint every N steps (always at each epoch's end)")
    add("--seed", type=int, default=0, help="seed of the split, the initial weights and SVI")
    add("--device", **DEVICE_OPTION)
    add("--resume", action="store_true",
        help="continue from OUT/checkpoint.pt: the same options and model file (refused "
             "otherwise), the run's own copy of the code")
    add_trust_option(parser)
    add("--overwrite", action="store_true",
        help="replace the run OUT already holds (its files are deleted first)")
    add("--tensorboard", action="store_true",
        help="also write OUT/tensorboard/ event files (needs the tensorboard package)")
    if fixed:
        parser.set_defaults(**fixed)


def add_common_options(parser, config=True):
    """Options every command takes: threads, how much it says, and config files."""
    group = parser.add_argument_group("common options")
    group.add_argument("--threads", type=positive_int, default=None,
                       help="torch CPU threads (default: $OMP_NUM_THREADS if set, else the "
                            "physical cores not busy with other work, shared among torchrun's "
                            "processes)")
    group.add_argument("--quiet", action="store_true",
                       help="no progress bars or progress messages: results and files written only")
    group.add_argument("--verbose", action="store_true", help="also debugging messages")
    group.add_argument("--debug", action="store_true",
                       help="on an error, the full traceback instead of one line")
    if config:
        group.add_argument("--config", default=None,
                           help="a TOML (or JSON) file of this command's options, names as on "
                                "the command line (- or _); for train also a run's config.json, "
                                "to repeat that run; options on the command line override it")
        group.add_argument("--print-config", action="store_true",
                           help="print this command's full resolved configuration as TOML (which "
                                "--config reads back) and stop")


DEVICE_OPTION = {"default": "cpu", "choices": ["cpu", "cuda"], "help": "where tensors live"}


def add_device_option(parser):
    parser.add_argument("--device", **DEVICE_OPTION)


def add_compile_option(add, what):
    """``--compile off|on|auto|inductor`` through ``add`` (a parser's ``add_argument``): ``what``
    is recorded once as a static graph and replayed (``ppl_lvm.compiled``)."""
    add("--compile", default="off", choices=list(COMPILE_MODES),
        help=f"record {what} once as a static graph and replay it (checked against eager "
             "Pyro on its first use; see ppl_lvm.compiled); auto: where it pays; inductor: also "
             "torch.compile it (seconds per shape: for long runs)")


def add_trust_option(parser):
    parser.add_argument("--trust-code", action="store_true",
                        help="run a run folder's user_model.py although this user did not train "
                             "it here (a run folder from someone else is code: read it first)")


# options that describe the experiment (recorded in config.json; --config reads them back)
EXPERIMENT_OPTIONS = (
    "model", "data", "data_path", "epochs", "batch_size", "lr", "lr_schedule", "z_dim",
    "hidden_dim", "likelihood", "guide", "semi_steps", "local_lr", "inner_steps", "inner_tol",
    "objective", "num_particles", "dreg", "missing", "components", "covariance", "mog_method",
    "option", "test_fraction", "eval_every", "checkpoint_every", "seed")


# what a resumed run must share with the run it continues: every option that changes the
# computation (not --eval-every or --checkpoint-every; --epochs only where a step schedule
# depends on the total), the model file by its SHA-256
IDENTITY_OPTIONS = tuple(k for k in EXPERIMENT_OPTIONS
                         if k not in ("model", "epochs", "eval_every", "checkpoint_every"))


def run_identity(args):
    """The run's identity (JSON-ready) from ``args``, as ``identity.json`` records it."""
    identity = {k: getattr(args, k) for k in IDENTITY_OPTIONS}
    identity["data_path"] = None if args.data_path is None else os.path.abspath(args.data_path)
    identity["option"] = user_options(args.option)
    if args.lr_schedule != "constant":
        identity["epochs"] = args.epochs
    if experiment.is_builtin(args.model):
        identity["model"] = args.model
    else:
        path, _, builder = str(args.model).partition(":")
        identity["model"] = f"file:{builder or 'build'}"
        identity["model_sha256"] = runs.code_hash(experiment.read_model_file(path))
    return identity


def check_identity(out, identity):
    """Refuse to resume ``out`` under options other than those it was started with."""
    import json

    path = out / runs.IDENTITY_NAME
    if not path.is_file():
        if holds_run(out):
            raise CLIError(f"--resume: {out} holds a run without {runs.IDENTITY_NAME} (started by "
                           "an older ppl_lvm, or not by `ppl-lvm train`), so the options it ran "
                           "under cannot be checked; train afresh with --overwrite")
        return  # nothing trained there: resuming it fails on the missing checkpoint
    try:
        saved = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError, OSError) as error:
        raise CLIError(f"{path} cannot be read ({error}): cannot tell what the run was; train "
                       "afresh with --overwrite") from error
    saved = json.loads(json.dumps(saved))
    identity = json.loads(json.dumps(identity))
    changed = [k for k in sorted(set(saved) | set(identity)) if saved.get(k) != identity.get(k)]
    if not changed:
        return

    def flag(key):
        return {"model_sha256": "model file", "option": "--option"}.get(
            key, "--" + key.replace("_", "-"))

    diff = ", ".join(f"{flag(k)} {saved.get(k)!r} -> {identity.get(k)!r}" for k in changed)
    raise CLIError(f"--resume: {out} was started with other options ({diff}); a resumed run "
                   "continues the same computation: give its options, or train into another "
                   "--out")


def read_config_file(path, allowed=None):
    """Options from a TOML file (names as on the command line, - or _) or a run's config.json;
    ``allowed``: the option names the command takes (default: ``train``'s)."""
    import json

    path = Path(path)
    if not path.is_file():
        raise CLIError(f"--config {path}: no such file")
    try:
        if path.suffix == ".json":
            values = json.loads(path.read_text())
            values = values.get("cli", values)
        else:
            try:
                import tomllib
            except ImportError:  # Python 3.10: the same parser, installed as tomli
                import tomli as tomllib
            values = tomllib.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise CLIError(f"--config {path} cannot be read: {error}") from error
    if not isinstance(values, dict):
        raise CLIError(f"--config {path} holds a {type(values).__name__}, not a table of options")
    options = {key.replace("-", "_"): value for key, value in values.items()}
    # where a run's folder is and whether to delete it are said on the command line only: a
    # received config file must not point --overwrite at someone's folder
    for key in COMMAND_LINE_ONLY:
        if key in options:
            raise CLIError(f"--config {path}: {key!r} is not taken from a file (it decides which "
                           f"folder is written or deleted); give --{key} on the command line")
    known = set(EXPERIMENT_OPTIONS) | {"out", "device", "quiet", "tensorboard", "overwrite",
                                       "demo_samples", "threads", "resume", "compile"}
    unknown = sorted(set(options) - (known if allowed is None else set(allowed)))
    if unknown:
        raise CLIError(f"--config {path}: unknown options {unknown}")
    return options


def typed_config(parser, options, path):
    """``options`` read from a config file, checked and converted by the same argparse
    definitions as the command line's (a file's value meets the same type, range and choices;
    a switch must be a TOML/JSON boolean, not the string "false")."""
    actions = {action.dest: action for action in parser._actions}
    typed = {}
    for key, value in options.items():
        action = actions.get(key)
        name = action.option_strings[-1] if action is not None and action.option_strings else key
        where = f"--config {path}: {key} = {value!r} ({name})"
        if action is None:
            typed[key] = value
        elif isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if not isinstance(value, bool):
                raise CLIError(f"{where} must be true or false (a boolean, not a "
                               f"{type(value).__name__})")
            typed[key] = value
        elif isinstance(action, argparse._AppendAction):
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise CLIError(f"{where} must be a list of strings like [\"key=value\"]")
            typed[key] = [action.type(v) if action.type else v for v in value]
        elif value is None:
            typed[key] = value
        else:
            if isinstance(value, (bool, list, dict)) or (
                    isinstance(value, float) and action.type is int):
                raise CLIError(f"{where} must be a single "
                               f"{getattr(action.type, '__name__', 'value')}, not a "
                               f"{type(value).__name__}")
            try:
                value = action.type(str(value)) if action.type else value
            except (argparse.ArgumentTypeError, ValueError, TypeError) as error:
                raise CLIError(f"{where}: {error}") from None
            if action.choices is not None and value not in action.choices:
                raise CLIError(f"{where}: choose from {', '.join(map(str, action.choices))}")
            typed[key] = value
    return typed


def user_options(pairs):
    """``--option key=value`` pairs as a dict (numbers parsed; true/false as booleans)."""
    import math

    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or not key.isidentifier():
            raise CLIError(f"--option takes KEY=VALUE with KEY a Python name (a keyword of "
                           f"build), got {pair!r}")
        if key in options:
            raise CLIError(f"--option {key} is given twice ({options[key]!r} and {value!r})")
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                pass
        if isinstance(value, float) and not math.isfinite(value):
            raise CLIError(f"--option {pair!r}: {value} is not a finite number")
        if value in ("true", "false"):
            value = value == "true"
        options[key] = value
    return options


def train(args):
    """Fit a model to a data set and write weights, metrics and pictures into ``args.out``."""
    if args.epochs is None and args.model != "mog":
        args.epochs = 50
    if args.epochs is not None and args.epochs < 0:
        raise CLIError(f"--epochs must be >= 0, got {args.epochs}")
    if not str(args.out).strip():
        raise CLIError("--out '' names no folder: give --out FOLDER")
    if not 0 < args.test_fraction < 1:
        raise CLIError(f"--test-fraction must be in (0, 1), got {args.test_fraction}")
    out = Path(args.out)
    identity = run_identity(args)
    if args.resume:  # before anything is loaded: the refusal names the options, not the data
        check_identity(out, identity)
    # absolute, so that `evaluate` run from another folder finds the same data
    data_path = None if args.data_path is None else os.path.abspath(args.data_path)
    data_config = {"name": args.data, "path": data_path, "test_fraction": args.test_fraction,
                   "split_seed": args.seed, "binarize": args.likelihood == "bernoulli"}
    logger.info(f"loading {args.data}" + (f" from {data_path}" if data_path else ""))
    x_train, x_test = run_data(data_config, args.device)
    if not ddp.is_main():
        return train_in(args, out, data_config, x_train, x_test)
    created = not out.exists()
    try:
        with RunLock(out):  # before the folder is judged: a run writing it now holds it
            prepare_run_folder(out, resume=args.resume, overwrite=args.overwrite)
            if args.resume:
                check_identity(out, identity)  # again: another run may have replaced it meanwhile
            else:
                atomic.write_json(out / runs.IDENTITY_NAME, identity)
            if args.resume and (out / CHECKPOINT_NAME).is_file():
                check_epochs(load_checkpoint(out / CHECKPOINT_NAME, "cpu"),
                             out / CHECKPOINT_NAME, args.epochs)
            return train_in(args, out, data_config, x_train, x_test)
    except BaseException:
        # a run that failed before its first checkpoint leaves no folder it made behind
        if created and out.is_dir() and not holds_run(out):
            import shutil

            shutil.rmtree(out, ignore_errors=True)
        raise


def build_experiment(args, data_dim, out=None):
    """The model module for ``args`` (a built-in name or path/to/file.py:build) and the run-config
    entries that rebuild it."""
    if experiment.is_builtin(args.model):
        module = experiment.builtin_module(args.model, data_dim, vars(args))
        return module, {}
    options = user_options(args.option)
    builder = str(args.model).partition(":")[2] or "build"
    own_copy = None if out is None else Path(out) / experiment.USER_FILE
    if args.resume and own_copy is not None and own_copy.exists():
        # a resumed run runs the code it started with (identity.json checked its hash)
        source = runs.read_run_code(out, getattr(args, "trust_code", False))
        module = experiment.user_module(f"{own_copy}:{builder}", data_dim, options, source=source)
    else:
        source = experiment.read_model_file(str(args.model).partition(":")[0])
        module = experiment.user_module(args.model, data_dim, options, copy_to=out,
                                        source=source)
        if out is not None:
            runs.trust(source)  # this user's own run: later commands may run its copy
    return module, {"model_file": experiment.USER_FILE, "builder": builder, "options": options,
                    "data_dim": data_dim, "source": str(Path(str(args.model).partition(":")[0])
                                                         .resolve())}


def check_combination(args):
    if args.option and experiment.is_builtin(args.model):
        raise CLIError(f"--option goes to a model file's build(); the built-in {args.model} "
                       "takes its own options (--z-dim, --hidden-dim, --likelihood, --components, "
                       "--covariance)")
    if args.missing:
        try:
            experiment.parse_missing_text(args.missing)
        except ValueError as error:
            raise CLIError(str(error)) from None
    if args.model == "mog" and (args.guide != "amortized" or args.objective != "elbo"):
        raise CLIError("mog is fitted by --mog-method (em, enum, reinforce, amortized); "
                       "--guide and --objective do not apply")
    if args.missing and args.model != "masked-vae":
        raise CLIError("--missing trains the model of missing pixels: use `train masked-vae`")
    if args.model == "masked-vae" and not args.missing:
        raise CLIError("masked-vae needs --missing (e.g. top_half or mcar:0.5)")
    kind = experiment.guide_kind(args.guide)
    if args.inner_steps and not kind.per_datapoint:
        local = " or ".join(n for n, k in experiment.GUIDE_KINDS.items() if k.per_datapoint)
        raise CLIError(f"--inner-steps steps the per-datapoint φ_i first: use it with --guide {local}")
    if kind.needs_encoder and args.model != "vae":
        raise CLIError(f"--guide {args.guide} refines the output of an encoder of x alone: "
                       f"`train vae` has one, {args.model} does not")
    if args.dreg and args.objective != "iwae":
        raise CLIError("--dreg goes with --objective iwae")
    if args.inner_tol is not None and not args.inner_steps:
        raise CLIError("--inner-tol stops the inner loop of --inner-steps S early: give both")
    if getattr(args, "tensorboard", False):
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError as error:
            raise CLIError(f"--tensorboard needs the tensorboard package ({error}); "
                           "pip install tensorboard, or leave the option out") from None


def train_in(args, out, data_config, x_train, x_test):
    """``train`` once the run folder is checked (and, on rank 0, locked)."""
    check_combination(args)
    torch.manual_seed(args.seed)
    module, model_entries = build_experiment(args, x_train.shape[1], out if ddp.is_main() else None)
    state_module(module).to(x_train.device)  # guides are read from the model on the data's device
    logger.info(f"training {args.model} ({args.guide} guide, {args.objective}) on {args.data}: "
        f"{len(x_train)} train / {len(x_test)} held-out rows of {x_train.shape[1]} values, "
        f"{args.epochs} epochs on {args.device}")
    start = time.perf_counter()
    cli_options = {k: getattr(args, k) for k in EXPERIMENT_OPTIONS}
    if model_entries:  # a user's file, by its absolute path: the config repeats from anywhere
        cli_options["model"] = f"{model_entries['source']}:{model_entries['builder']}"
    run_config = {"data": data_config, "cli": cli_options, **model_entries, "train": {
        k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "seed")}}
    if args.model == "mog":
        return train_mixture(args, out, module, run_config, x_train, x_test, start)
    data, test_data, test_kwargs = (x_train,), (x_test,), {}
    if args.model == "masked-vae":
        mask = experiment.parse_missing(args.missing, len(x_train), x_train.shape[1], args.seed,
                                        x_train.device)
        test_mask = experiment.parse_missing(args.missing, len(x_test), x_test.shape[1],
                                             args.seed + 1, x_test.device)
        data, test_data, test_kwargs = (x_train, mask), (x_test, test_mask), {"mask": test_mask}
    guide = experiment.make_guide(args.guide, module, len(x_train), data, vars(args))
    loss = experiment.make_loss(args.objective, args.num_particles, args.dreg)
    binarize = (lambda *batch: (torch.bernoulli(batch[0]),) + batch[1:] if len(batch) > 1
                else torch.bernoulli(batch[0])) if data_config["binarize"] else None
    log = out / "metrics.jsonl" if ddp.is_main() else None
    record = epoch_log(log, args, steps_per_epoch=-(-len(x_train) // args.batch_size))

    eval_data = None if experiment.guide_kind(args.guide).per_datapoint else (
        test_data if len(test_data) > 1 else x_test)
    result = fit(module.model, guide, data if len(data) > 1 else x_train, epochs=args.epochs,
                 batch_size=args.batch_size, lr=args.lr, device=args.device, seed=args.seed,
                 progress=bars.enabled(), eval_data=eval_data, eval_every=args.eval_every,
                 checkpoint_dir=out, checkpoint_every=args.checkpoint_every, resume=args.resume,
                 transform=binarize, loss=loss, inner_steps=args.inner_steps,
                 inner_tol=args.inner_tol, local_lr=args.local_lr,
                 lr_schedule=None if args.lr_schedule == "constant" else args.lr_schedule,
                 callback=record, compile=COMPILE_MODES[getattr(args, "compile", "off")])
    if result.compiled and ddp.is_main():
        logger.info(result.compiled)
    train_time = time.perf_counter() - start
    # what SVI fitted: θ and λ or the φ_i table (an unused encoder does not count), read before
    # the held-out φ are added
    num_parameters = sum(value.numel() for value in pyro.get_param_store().values()) or sum(
        p.numel() for p in state_module(module).parameters())
    held_guide, est_kwargs, note = experiment.held_out_guide(
        args.guide, module, module.model, guide, x_test, test_kwargs)
    from ppl_lvm.estimators import estimate_log_marginal
    elbo = estimate_log_marginal(module.model, held_guide, x_test, method="elbo", num_samples=10,
                                 seed=0, **est_kwargs, **test_kwargs).mean
    metrics = {"heldout_elbo": elbo, "train_loss": result.epoch_losses[-1] if result.epoch_losses else None,
               "epochs": args.epochs, "steps": result.step, "wall_time_s": time.perf_counter() - start,
               "train_time_s": train_time, "eval_epochs": result.eval_epochs,
               "eval_elbos": result.eval_elbos, "epoch_losses": result.epoch_losses,
               "num_parameters": num_parameters}
    if not ddp.is_main():  # the global params are the same on every rank: rank 0 writes them
        return metrics
    fingerprint = None if model_entries == {} else runs.output_fingerprint(module, x_test)
    save_run(out, args.model if experiment.is_builtin(args.model) else "file", module, run_config,
             metrics, fingerprint=fingerprint)
    if hasattr(module, "reconstruct") and hasattr(module, "sample"):
        write_pictures(module, x_test, result, out)
    else:
        plots.training_curve(result, out / "training_curve.png", title=f"{args.model} training")
    logger.log(RESULT, f"held-out ELBO: {elbo:.2f} nats/image ({len(x_test)} images, 10 samples each{note}); "
          f"{metrics['wall_time_s']:.0f} s; wrote {out}")
    return metrics


def epoch_log(log, args, steps_per_epoch):
    """fit's ``callback``: one JSON line per epoch in ``log`` (metrics.jsonl) as training goes:
    ``train_elbo`` (the epoch's mean minibatch ELBO per row, nats; higher is better), ``loss``
    (the same with the optimiser's sign, -ELBO), ``heldout_elbo`` when it was evaluated, the step-size factor of the
    schedule at the epoch's last step and the wall time. ``compare`` and the curve PNG read it.

    The file is rewritten whole through ``atomic`` each epoch (it is small), so a killed run leaves
    it complete up to some epoch; a resumed run keeps the lines of the epochs it does not redo.
    """
    import json

    from ppl_lvm.train import lr_factor

    writer = None
    if log is not None and getattr(args, "tensorboard", False):
        from torch.utils.tensorboard import SummaryWriter  # importable: check_combination saw

        writer = SummaryWriter(str(log.parent / "tensorboard"))
    lines = []
    if log is not None and args.resume and log.is_file():
        lines = [line for line in log.read_text().splitlines() if line.strip()]
    elif log is not None and log.exists():
        log.unlink()

    def record(epoch, result):
        if log is None:
            return False
        # one sign for the ELBOs (higher is better); "loss" is the optimiser's, -ELBO
        entry = {"epoch": epoch, "train_elbo": -result.epoch_losses[-1],
                 "loss": result.epoch_losses[-1], "step": result.step,
                 "lr_factor": lr_factor(args.lr_schedule, max(result.step - 1, 0),
                                        args.epochs * steps_per_epoch),
                 "wall_time_s": result.wall_time}
        if result.eval_epochs and result.eval_epochs[-1] == epoch:
            entry["heldout_elbo"] = result.eval_elbos[-1]
        kept = [line for line in lines if json.loads(line)["epoch"] < epoch]
        lines[:] = kept + [json.dumps(entry)]
        atomic.write_text(log, "\n".join(lines) + "\n")
        if writer is not None:
            for key in ("loss", "heldout_elbo", "lr_factor"):
                if key in entry:
                    writer.add_scalar(key, entry[key], epoch)
            writer.flush()
        return False

    return record


def train_mixture(args, out, module, run_config, x_train, x_test, start):
    """``train mog``: ``fit_mixture`` (EM by default) and the exact held-out log-likelihood."""
    from ppl_lvm.mixtures import fit_mixture

    caps = {} if args.epochs is None else {"max_iter": args.epochs, "max_epochs": args.epochs}
    if args.epochs == 0:
        raise CLIError("--epochs 0 fits no mixture: give at least 1 (or leave it out)")
    fitted = fit_mixture(x_train, args.components, method=args.mog_method,
                         covariance=args.covariance, seed=args.seed, device=args.device,
                         dtype=torch.float32, **caps)
    module.load_state_dict(fitted.mixture.state_dict())
    with torch.no_grad():
        log_px = module.log_prob(x_test)
    metrics = {"heldout_log_px": log_px.mean().item(), "heldout_elbo": log_px.mean().item(),
               "epochs": fitted.epochs, "steps": fitted.epochs, "epoch_losses": fitted.losses,
               "wall_time_s": time.perf_counter() - start, "train_time_s": time.perf_counter() - start,
               "eval_epochs": [], "eval_elbos": [],
               "num_parameters": sum(p.numel() for p in module.parameters())}
    save_run(out, "mog", module, run_config, metrics)
    logger.log(RESULT, f"held-out log p(x): {metrics['heldout_log_px']:.2f} nats/row (exact, {len(x_test)} rows; "
          f"{args.mog_method}, {fitted.epochs} iterations); wrote {out}")
    return metrics


def write_pictures(vae, x_test, result, out):
    """reconstructions.png, samples.png and training_curve.png in ``out``."""
    vae = vae.eval()
    shown = x_test[:12]
    plots.image_grid([shown, vae.reconstruct(shown)], out / "reconstructions.png",
                     row_labels=["data", "recon."], title="held-out images and reconstructions")
    samples = vae.sample(48, generator=torch.Generator(shown.device).manual_seed(0))
    plots.image_grid(list(samples.reshape(4, 12, -1)), out / "samples.png",
                     title="samples: E[x | z], z ~ N(0, I)")
    plots.training_curve(result, out / "training_curve.png", title="VAE training")


def run_guide(module, config, x_test, local_steps=300):
    """The guide a run's held-out rows are scored with, the estimators' keywords and a note:
    the amortized guide; for a per-datapoint run, φ fitted to the held-out rows with the model
    frozen (``infer_local``); the semi-amortized guide rebuilt; the held-out masks of a run
    trained with missing pixels."""
    options = config.get("cli", {})
    kind = options.get("guide", "amortized")
    kwargs = {}
    if options.get("missing"):
        kwargs["mask"] = experiment.parse_missing(options["missing"], len(x_test),
                                                  x_test.shape[1], options.get("seed", 0) + 1,
                                                  x_test.device)
    if kind in experiment.GUIDE_KINDS and not experiment.guide_kind(kind).per_datapoint:
        return experiment.make_guide(kind, module, len(x_test), (x_test,), options), kwargs, ""
    guide, extra, note = experiment.held_out_guide(kind, module, module.model,
                                                   getattr(module, "guide", None), x_test, kwargs,
                                                   steps=local_steps)
    return guide, {**kwargs, **extra}, note


AIS_CHAINS = 16  # evaluate --method ais's default K, as ais_log_marginal's


@dataclasses.dataclass(frozen=True)
class Method:
    """An estimator of log p(x) that ``evaluate --method`` offers.

    help: its line in ``--help`` (none: not described there). num_samples: -K's default.
    num_steps: it anneals over -T temperatures, each an HMC transition (5 leapfrog steps and an
    acceptance test per chain). khat: its weights are importance weights whose Pareto k̂ says
    whether to trust them. estimate: ``estimate(model, guide, x, method=, num_samples=, seed=,
    **options) -> LogMarginalEstimate``; None: ``ppl_lvm.estimators.estimate_log_marginal``.
    """

    help: str = ""
    num_samples: int = 1000
    num_steps: bool = False
    khat: bool = True
    estimate: object = None


# the estimators of `evaluate --method`: a new one is a file with its estimate function and
# one entry here
METHODS = {
    "iwae": Method("the importance-weighted bound with q(z | x)"),
    "elbo": Method("Jensen's bound"),
    "prior": Method("naive Monte Carlo with z ~ p(z)"),
    "is": Method(),
    "ais": Method("annealed importance sampling from q(z | x), K chains of T HMC steps (a "
                  "tighter lower bound)", num_samples=AIS_CHAINS, num_steps=True, khat=False),
}


@program.in_evaluation_mode
def evaluate(args):
    """Held-out per-datapoint estimates of log p(x) for a trained run (``log_marginal``)."""
    from ppl_lvm.estimators import LogMarginalEstimate, estimate_log_marginal

    stamp = runs.run_stamp(args.run)
    vae, config = load_run(args.run, args.device, getattr(args, "trust_code", False))
    _, x_test = run_data(config["data"], args.device)
    if args.n is not None:
        x_test = x_test[:args.n]
    start = time.perf_counter()
    spec = METHODS[args.method]
    if args.num_samples is None:
        args.num_samples = spec.num_samples
    logger.info(f"{args.run}: log p(x) by {args.method}, K={args.num_samples}"
                + (f", T={args.num_steps}" if spec.num_steps else "")
                + f", on {len(x_test)} held-out images" + (
                    f" ({len(x_test) * args.num_samples * args.num_steps * 6:,} model gradient "
                    "evaluations: 5 leapfrog steps and an acceptance test per temperature and "
                    "chain; --n takes fewer images)" if spec.num_steps else ""))
    guide, options, note = run_guide(vae, config, x_test)
    options.update(method=args.method, num_samples=args.num_samples, seed=args.seed)
    if config.get("model") == "mog":  # the assignment is discrete: log p(x) exactly
        if args.method != "iwae":
            raise CLIError(f"{args.run} is a mixture: its held-out log p(x) is exact (by "
                           f"enumeration), so --method {args.method} does not apply; leave "
                           "--method out")
        options["method"], note = "exact", " (a mixture: exact, by enumeration)"
    method = options["method"]
    if spec.num_steps:
        options["num_steps"] = args.num_steps
    compile_mode = COMPILE_MODES[getattr(args, "compile", "off")]
    if compile_mode and method != "exact":
        options["compile"] = compile_mode
    if spec.estimate is not None and method != "exact":
        estimate = spec.estimate(vae.model, guide, x_test, **options)
    elif ddp.active():  # rows split across ranks, gathered back in order
        log_px = ddp.log_marginal(vae.model, guide, x_test, **options)
        estimate = LogMarginalEstimate(log_px, torch.full_like(log_px, float("nan")),
                                       args.method, args.num_samples)
    else:
        estimate = estimate_log_marginal(vae.model, guide, x_test, **options)
    seconds = time.perf_counter() - start
    unreliable = None if estimate.khat is None else int(estimate.unreliable.sum())
    # two errors of two kinds: the sampler's (a rerun with another seed moves the mean by about
    # mc_stderr) and the rows' (another draw of held-out rows: stderr = sd / √N)
    result = {"method": method, "num_samples": args.num_samples, "num_images": len(x_test),
              "mean": estimate.mean, "stderr": estimate.stderr,
              "mc_stderr": estimate.mean_mc_stderr,
              "sd": estimate.log_px.std().item() if len(x_test) > 1 else 0.0,
              "median_ess": estimate.ess.median().item(), "wall_time_s": seconds,
              "khat_above_0.7": unreliable}
    if spec.num_steps:
        result["num_steps"] = args.num_steps
    compiled_line = getattr(estimate, "compiled", None)
    if compiled_line:
        result["compiled"] = compiled_line
        if ddp.is_main():
            logger.info(compiled_line)
    if ddp.is_main():
        ess = "" if method == "exact" or ddp.active() else f"; median ESS {result['median_ess']:.1f}"
        if unreliable is not None and spec.khat and args.num_samples >= 25:
            ess += f"; Pareto k̂ > 0.7 (not to be trusted) for {unreliable} images"
        steps = f", T={args.num_steps}" if spec.num_steps else ""
        samples = "" if method == "exact" else f", K={args.num_samples}{steps}"
        mc = result["mc_stderr"]
        mc = "" if mc is None else " (exact)" if method == "exact" else f" ± {mc:.2g} (Monte Carlo)"
        logger.log(RESULT, f"held-out log p(x) by {method}{samples}: {estimate.mean:.2f}{mc} "
              f"nats/image; over {len(x_test)} images: s.e. {estimate.stderr:.2f}, sd "
              f"{result['sd']:.2f} ({seconds:.1f} s{ess}){note}")
        # the file names what was computed: a mixture's exact log p(x) draws no samples
        name = "evaluate_exact" if method == "exact" else (
            f"evaluate_{args.method}_K{args.num_samples}"
            + (f"_T{args.num_steps}" if spec.num_steps else ""))
        path = Path(args.run) / f"{name}.json"
        runs.write_into_run(args.run, stamp, lambda: atomic.write_json(path, result))
        logger.log(RESULT, f"wrote {path}")
    return result


def paired_difference(log_px, baseline, mc_stderr=None, baseline_mc_stderr=None):
    """The difference of two runs' per-datapoint log p(x_n) [N] on the same held-out rows.

    mean: mean_n (log_px_n - baseline_n); stderr: the paired standard error std_n(d_n) / √N (the
    rows' own variation cancels: far smaller than the unpaired sqrt(s_a² + s_b²)); mc_stderr: the
    Monte Carlo part, sqrt(Σ_n (e_n² + e'_n²)) / N from each estimate's own error; within_noise:
    |mean| ≤ 2 × stderr (the difference is not distinguishable from the rows' and samplers'
    noise at about 95 %)."""
    diff = (log_px.double() - baseline.double())
    count = diff.numel()
    stderr = diff.std().item() / math.sqrt(count) if count > 1 else math.inf
    unpaired = math.sqrt(log_px.double().var().item() / count + baseline.double().var().item() / count) \
        if count > 1 else math.inf
    mc = None
    if mc_stderr is not None and baseline_mc_stderr is not None:
        mc = math.sqrt((mc_stderr.double() ** 2 + baseline_mc_stderr.double() ** 2).sum().item()) / count
    mean = diff.mean().item()
    return {"mean": mean, "stderr": stderr, "unpaired_stderr": unpaired, "mc_stderr": mc,
            "within_noise": abs(mean) <= 2 * stderr}  # <=: a run against itself is within noise


@program.in_evaluation_mode
def compare(args):
    """Side by side: held-out ELBO and IWAE-K (± s.e.), optionally the gaps, training time and
    parameters of each run; the difference of each run's log p(x) from the first run's on the
    same held-out rows with its paired standard error; a PNG of the held-out ELBO against epochs
    and wall time."""
    import json

    from ppl_lvm.estimators import estimate_log_marginal
    from ppl_lvm.recipes import amortization_gaps

    rows, curves, per_row = [], {}, []
    for run in args.runs:
        logger.info(f"{run}: held-out ELBO (K=100) and IWAE (K={args.num_samples}) on the first "
                    f"{args.n} held-out rows" + (", then the gaps" if args.gaps else ""))
        module, config = load_run(run, args.device, args.trust_code)
        metrics = json.loads((Path(run) / "metrics.json").read_text())
        _, x_test = run_data(config["data"], args.device)
        num_heldout, x_test = len(x_test), x_test[:args.n]
        guide, kwargs, note = run_guide(module, config, x_test, local_steps=args.local_steps)
        method = "exact" if config.get("model") == "mog" else None
        elbo = estimate_log_marginal(module.model, guide, x_test, method=method or "elbo",
                                     num_samples=100, seed=args.seed, **kwargs)
        iwae = estimate_log_marginal(module.model, guide, x_test, method=method or "iwae",
                                     num_samples=args.num_samples, seed=args.seed, **kwargs)
        per_row.append((x_test, iwae))
        row = {"run": str(run), "model": config.get("model"),
               "guide": config.get("cli", {}).get("guide", "amortized"),
               "num_rows": len(x_test), "num_heldout": num_heldout, "method": method or "iwae",
               "heldout_elbo": elbo.mean, "heldout_elbo_mc_stderr": elbo.mean_mc_stderr,
               "heldout_log_px": iwae.mean,
               "log_px_stderr": iwae.stderr, "log_px_mc_stderr": iwae.mean_mc_stderr,
               "train_time_s": metrics.get("train_time_s", metrics.get("wall_time_s")),
               "num_parameters": metrics.get("num_parameters"), "note": note.strip()}
        if args.gaps and method is None and experiment.guide_kind(row["guide"]).amortized and (
                not kwargs):
            encoder = experiment.gap_encoder(module, module.guide, x_test)
            gaps = amortization_gaps(module.model, module.guide, x_test, encoder=encoder,
                                     num_samples=args.num_samples, local_steps=args.local_steps,
                                     seed=args.seed).summary()
            row.update(approximation_gap=gaps["approximation_gap"],
                       amortization_gap=gaps["amortization_gap"],
                       approximation_gap_mc_stderr=gaps["approximation_gap_mc_stderr"],
                       amortization_gap_mc_stderr=gaps["amortization_gap_mc_stderr"],
                       negative_amortization_gap=gaps["negative_amortization_gap"])
        rows.append(row)
        log = Path(run) / "metrics.jsonl"
        if log.is_file():
            curves[str(run)] = [json.loads(line) for line in log.read_text().splitlines() if line]
    # the rows are said: a mean over the first n rows is not `evaluate`'s mean over all of them
    # (a mixture's per-row log p(x) can have a tail of rows far below the rest)
    logger.log(RESULT, "on the first " + ", ".join(sorted({f"{r['num_rows']} of {r['num_heldout']}"
                                                          for r in rows}))
               + " held-out rows (`ppl-lvm evaluate RUN --n N` scores the same rows); ± s.e. over "
               "the rows, then the Monte Carlo s.e. of the mean"
               + ("; a mixture's ELBO and log p(x) are exact (enumerated)"
                  if any(r["method"] == "exact" for r in rows) else ""))
    header = (f"| run | model | guide | held-out ELBO | log p(x), IWAE-{args.num_samples} | "
              "MC s.e. | approx. gap | amort. gap | train s | parameters |")
    logger.log(RESULT, header)
    logger.log(RESULT, "|" + "---|" * 10)
    for r in rows:
        gap = lambda key: f"{r[key]:.2f}" if key in r else "—"  # noqa: E731
        mc = "—" if r["log_px_mc_stderr"] is None else f"{r['log_px_mc_stderr']:.2g}"
        logger.log(RESULT, f"| {r['run']} | {r['model']} | {r['guide']} | {r['heldout_elbo']:.2f} | "
              f"{r['heldout_log_px']:.2f} ± {r['log_px_stderr']:.2f} | {mc} | "
              f"{gap('approximation_gap')} | "
              f"{gap('amortization_gap')} | {r['train_time_s']:.1f} | {r['num_parameters']} |")
    _print_paired(rows, per_row)
    png, table = compare_paths(args.out)
    atomic.write_json(table, rows)
    logger.log(RESULT, f"wrote {table}")
    if curves:
        plots.compare_curves(curves, png)
        logger.log(RESULT, f"wrote {png}")
    return rows


def compare_paths(out):
    """(PNG, JSON) that ``compare --out OUT`` writes: OUT.png and OUT.json, whichever of the two
    OUT names (never one over the other)."""
    if not out or not Path(out).name or Path(out).is_dir():
        raise CLIError(f"compare --out {out!r} must name a file, e.g. compare.png")
    out = Path(out)
    stem = out.with_suffix("") if out.suffix.lower() in (".png", ".json") else out
    return stem.with_name(stem.name + ".png"), stem.with_name(stem.name + ".json")


def _print_paired(rows, per_row):
    """Each run against the first on the same held-out rows: Δ log p(x) with its paired s.e."""
    if len(rows) < 2:
        return
    base_x, base = per_row[0]
    logger.log(RESULT, f"differences from {rows[0]['run']} on the same held-out rows (paired: the rows' own "
          "variation cancels; within noise: |Δ| < 2 paired s.e.)")
    logger.log(RESULT, "| run | Δ log p(x) | paired s.e. | Monte Carlo s.e. | unpaired s.e. | |")
    logger.log(RESULT, "|" + "---|" * 6)
    for row, (x_test, estimate) in zip(rows[1:], per_row[1:]):
        if x_test.shape != base_x.shape or not torch.equal(x_test, base_x):
            row["paired"] = None
            logger.log(RESULT, f"| {row['run']} | — | — | — | — | other held-out rows: not paired |")
            continue
        paired = paired_difference(estimate.log_px, base.log_px, estimate.mc_stderr,
                                   base.mc_stderr)
        row["paired"] = {"baseline": rows[0]["run"], **paired}
        mc = "—" if paired["mc_stderr"] is None else f"{paired['mc_stderr']:.3f}"
        verdict = "within noise" if paired["within_noise"] else "differs"
        logger.log(RESULT, f"| {row['run']} | {paired['mean']:+.3f} | {paired['stderr']:.3f} | {mc} | "
              f"{paired['unpaired_stderr']:.3f} | {verdict} |")


@program.in_evaluation_mode
def run_bdmc(args):
    """The BDMC sandwich on images simulated from a trained run's model (Grosse et al. 2015)."""
    from ppl_lvm.ais import bdmc

    stamp = runs.run_stamp(args.run)
    module, config = load_run(args.run, args.device, getattr(args, "trust_code", False))
    if config.get("model") == "mog":
        raise CLIError(f"{args.run} is a mixture: its log p(x) is exact (`evaluate`), there is "
                       "nothing for BDMC to bound")
    if isinstance(module, VAE) and getattr(module, "likelihood", "bernoulli") == "gaussian":
        raise CLIError(f"{args.run} is a Gaussian VAE: BDMC scores images simulated from the "
                       "model, and its Gaussian draws leave [0, 1], where the VAE checks its "
                       "pixels; run bdmc on a Bernoulli run (`evaluate --method ais` bounds log "
                       "p(x) of real held-out images)")
    data_dim = getattr(module, "data_dim", None) or config.get("data_dim")
    start = time.perf_counter()
    result = bdmc(module.model, module.guide, num_data=args.n, data_shape=(data_dim,),
                  device=args.device, num_steps=args.num_steps, num_samples=args.num_samples,
                  seed=args.seed, compile=COMPILE_MODES[getattr(args, "compile", "off")])
    seconds = time.perf_counter() - start
    for direction in (result.forward, result.reverse):
        if getattr(direction, "compiled", None):
            logger.info(direction.compiled)
    lower_mc, upper_mc = result.forward.mean_mc_stderr, result.reverse.mean_mc_stderr
    summary = {"num_images": args.n, "num_steps": args.num_steps, "num_samples": args.num_samples,
               "lower": result.lower.mean().item(), "upper": result.upper.mean().item(),
               "gap": result.gap.mean().item(), "wall_time_s": seconds,
               # the chains' own error of each mean (delta method on the weights); the two
               # directions draw independent chains, so the gap's adds in quadrature
               "lower_mc_stderr": lower_mc, "upper_mc_stderr": upper_mc,
               "gap_mc_stderr": math.sqrt(lower_mc ** 2 + upper_mc ** 2),
               "gap_sd": result.gap.std().item() if args.n > 1 else 0.0}
    logger.log(RESULT, f"BDMC on {args.n} simulated images, T={args.num_steps}, K={args.num_samples}: "
          f"{summary['lower']:.2f} (± {lower_mc:.2g} MC) <= log p(x) <= {summary['upper']:.2f} "
          f"(± {upper_mc:.2g} MC) nats/image (gap {summary['gap']:.2f} ± "
          f"{summary['gap_mc_stderr']:.2g} MC, sd over images {summary['gap_sd']:.2f}; {seconds:.1f} s)")
    path = Path(args.run) / f"bdmc_T{args.num_steps}_K{args.num_samples}.json"
    runs.write_into_run(args.run, stamp, lambda: atomic.write_json(path, summary))
    logger.log(RESULT, f"wrote {path}")
    return summary


@program.in_evaluation_mode
def gaps(args):
    """Approximation and amortization gaps (Cremer et al. 2018) of a trained run on held-out images."""
    from ppl_lvm.recipes import amortization_gaps

    stamp = runs.run_stamp(args.run)
    vae, config = load_run(args.run, args.device, getattr(args, "trust_code", False))
    kind = config.get("cli", {}).get("guide", "amortized")
    if experiment.guide_kind(kind).per_datapoint or config.get("model") == "mog":
        what = "a mixture (its posterior is exact)" if config.get("model") == "mog" else \
            f"--guide {kind}: its encoder was never trained as q(z | x)"
        raise CLIError(f"gaps measures the amortization gap of a run's encoder; {args.run} was "
                       f"trained with {what}")
    _, x_test = run_data(config["data"], args.device)
    x_test = x_test[:args.n]
    logger.info(f"gaps of {args.run} on {len(x_test)} held-out images: q* by {args.local_steps} steps "
          f"per image, log p(x) by IWAE with K={args.num_samples}")
    start = time.perf_counter()
    result = amortization_gaps(vae.model, vae.guide, x_test, num_samples=args.num_samples,
                               encoder=experiment.gap_encoder(vae, vae.guide, x_test),
                               elbo_samples=args.elbo_samples, local_steps=args.local_steps,
                               local_lr=args.local_lr, seed=args.seed)
    summary = {**result.summary(), "local_steps": args.local_steps,
               "wall_time_s": time.perf_counter() - start}
    runs.write_into_run(args.run, stamp,
                        lambda: atomic.write_json(Path(args.run) / "gaps.json", summary))
    logger.log(RESULT, result)
    logger.log(RESULT, f"wrote {Path(args.run) / 'gaps.json'}")
    return summary


def add_gaps_parser(commands):
    p = commands.add_parser("gaps", help="approximation and amortization gaps of a trained run")
    p.add_argument("run", help="a folder written by `ppl-lvm train`")
    p.add_argument("-K", "--num-samples", type=positive_int, default=5000,
                   help="importance samples for log p(x) (IWAE)")
    p.add_argument("--n", type=positive_int, default=200, help="the first n held-out images")
    p.add_argument("--elbo-samples", type=positive_int, default=100,
                   help="samples of each ELBO (amortized q and q*)")
    p.add_argument("--local-steps", type=positive_int, default=300,
                   help="optimisation steps of each image's own q* (decoder frozen)")
    p.add_argument("--local-lr", type=positive_float, default=1e-2, help="step size of q*'s steps")
    p.add_argument("--seed", type=int, default=0, help="seed of the samples and q*'s start")
    add_device_option(p)
    add_common_options(p)
    add_trust_option(p)
    p.set_defaults(func=gaps)


def demo(args):
    """The mission in a few minutes: train the VAE on the bundled MNIST, print its held-out ELBO and
    log p(x) by IWAE (± s.e., ESS), write samples, reconstructions, curves and a top-half
    completion grid, and print the commands to try next."""
    args.model, args.data, args.data_path = "vae", "mnist", None
    args.guide, args.objective, args.missing = "amortized", "elbo", None
    start = time.perf_counter()
    metrics = train(args)
    if not ddp.is_main():
        return metrics
    common = dict(run=args.out, seed=0, device=args.device)
    estimate = evaluate(argparse.Namespace(**common, method="iwae", num_samples=args.demo_samples,
                                           num_steps=None, n=None))
    complete(argparse.Namespace(**common, mask="top_half", n=12, samples=4, method="mwg",
                                num_particles=1000, num_steps=200, rate=0.5, block_size=14,
                                out=None))
    out = args.out
    logger.log(RESULT, f"demo done in {time.perf_counter() - start:.0f} s: held-out ELBO {metrics['heldout_elbo']:.2f}, "
          f"log p(x) by IWAE-{args.demo_samples} {estimate['mean']:.2f}"
          + ("" if estimate["mc_stderr"] is None else f" ± {estimate['mc_stderr']:.3f} (Monte Carlo)")
          + " nats/image, s.e. over images "
          f"{estimate['stderr']:.2f} (median ESS {estimate['median_ess']:.1f}); pictures in {out}/\n"
          "next, try:\n"
          f"  ppl-lvm evaluate {out} -K 5000                      # a tighter log p(x)\n"
          f"  ppl-lvm train vae --guide local --inner-steps 5 --lr-schedule cosine --epochs 20 "
          f"--out {out}-local\n"
          f"  ppl-lvm compare {out} {out}-local --gaps -K 1000   # amortized vs per-datapoint\n"
          f"  ppl-lvm complete {out} --mask bottom_half          # fill in missing pixels\n"
          f"  ppl-lvm train --config {out}/config.json --out {out}-again   # repeat the run")
    return {**metrics, "log_px": estimate}


@program.in_evaluation_mode
def complete(args):
    """Complete held-out images of a trained run from the posterior p(x_miss | x_obs); write a PNG grid.

    Rows: the originals, the observed pixels (missing ones in ``plots.MISSING_COLOR``), then
    ``--samples`` completions.
    A plain VAE's encoder never saw missing pixels: q(z | zero-filled x) is a poor proposal, so its
    Metropolis-within-Gibbs chains propose z from q(z | x_obs and the current completion), a full
    image like those it was trained on (Rezende et al. 2014); a MaskedVAE proposes from q(z | x_obs).
    """
    from ppl_lvm import completion
    from ppl_lvm.models import missing

    stamp = runs.run_stamp(args.run)
    module, config = load_run(args.run, args.device, getattr(args, "trust_code", False))
    if config.get("model") == "mog":
        raise CLIError(f"{args.run} is a mixture: its completions are exact (p(x_miss | x_obs) is "
                       "a mixture of Gaussians), use ppl_lvm.completion.mixture_conditional; "
                       "`complete` samples latent-variable models with a guide")
    # a model from a user's file is completed as it is: its guide fed the current completion
    proposal = "observed" if isinstance(module, missing.MaskedVAE) else "completed"
    if isinstance(module, VAE) and not isinstance(module, missing.MaskedVAE):
        plain = module
        module = missing.MaskedVAE(**plain.config(), encoder_sees_mask=False).to(args.device)
        module.load_state_dict(plain.state_dict())
    state_module(module).eval()
    _, x_test = run_data(config["data"], args.device)
    x = x_test[:args.n]
    mask = missing.make_mask(args.mask, x.shape[0], x.shape[1], rate=args.rate,
                             block_size=args.block_size, seed=args.seed, device=x.device)
    result = completion.complete(module.model, module.guide, x, mask, num_samples=args.samples,
                                 method=args.method, num_particles=args.num_particles,
                                 num_steps=args.num_steps, proposal=proposal, seed=args.seed)
    # each completion drawn as E[x_miss | z_s] beside the observed pixels: smoother to read than
    # the Bernoulli draws themselves (result.samples), which carry the same z_s
    shown = torch.where(mask, x, result.sample_means).clamp(0, 1)
    out = completion_path(args.out, args.run, args.mask)
    out.parent.mkdir(parents=True, exist_ok=True)
    def write():
        plots.completion_grid(x, mask, shown, out,
                              labels=[f"sample {i + 1}" for i in range(args.samples)],
                              title=f"{args.mask}: completions E[x_miss | z_s], z_s ~ p(z | x_obs) "
                                    f"({args.method})")

    if args.out is None:  # into the run: only if it is still the run that was loaded
        runs.write_into_run(args.run, stamp, write)
    else:
        write()
    scores = completion.imputation_scores(x, mask, result.mean,
                                          binary=bool(config["data"].get("binarize")))
    logger.log(RESULT, f"completed {x.shape[0]} images ({args.mask}, {int((~mask).sum())} missing pixels) by "
          f"{args.method}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items())
          + f" of the posterior mean; wrote {out}")
    return scores


def completion_path(out, run, mask):
    """Where ``complete`` writes its PNG: ``--out`` as given (".png" added if it has no suffix), or
    inside it when it names a folder (an existing one, or one written with a trailing slash)."""
    name = f"completions_{mask}.png"
    if out is None:
        return Path(run) / name
    if Path(out).is_dir() or out.endswith(("/", os.sep)):
        return Path(out) / name
    out = Path(out)
    return out if out.suffix.lower() == ".png" else out.with_name(out.name + ".png")


def add_complete_parser(commands):
    """`ppl-lvm complete RUN --mask top_half --n 16`: the ``complete`` subcommand."""
    from ppl_lvm.completion import COMPLETION_METHODS
    from ppl_lvm.models.missing import MASKS

    p = commands.add_parser("complete", help="complete images with missing pixels (PNG grid)")
    p.add_argument("run", help="a folder written by `ppl-lvm train`")
    p.add_argument("--mask", default="top_half", choices=MASKS, help="which pixels are missing")
    p.add_argument("--n", type=positive_int, default=16, help="the first n held-out images")
    p.add_argument("--num-completions", "--samples", dest="samples", type=positive_int, default=4,
                   help="completions per image")
    p.add_argument("--method", default="mwg", choices=COMPLETION_METHODS,
                   help="sampling-importance-resampling or Metropolis-within-Gibbs")
    p.add_argument("--num-particles", type=positive_int, default=1000, help="K for SIR")
    p.add_argument("--num-sweeps", "--num-steps", dest="num_steps", type=positive_int, default=200,
                   help="Metropolis-within-Gibbs sweeps, for --method mwg")
    p.add_argument("--rate", type=float, default=0.5, help="missing rate for --mask mcar")
    p.add_argument("--block-size", type=positive_int, default=14, help="side for --mask blocks")
    p.add_argument("--seed", type=int, default=0, help="seed of the mask and the samplers")
    p.add_argument("--out", default=None, help="PNG path (default RUN/completions_MASK.png)")
    add_device_option(p)
    add_common_options(p)
    add_trust_option(p)
    p.set_defaults(func=complete)


def join_torchrun(args):
    """Under ``torchrun --nproc_per_node=P -m ppl_lvm ...``: join the process group (gloo on the
    CPU, NCCL with --device cuda, one GPU per rank); ``fit`` and the evaluation then split the
    data over the ranks, and rank 0 alone prints and writes the run folder."""
    if not ddp.launched() or int(os.environ["WORLD_SIZE"]) < 2:
        return
    ddp.init(device=getattr(args, "device", "cpu"))
    if getattr(args, "device", "cpu") == "cuda":
        args.device = str(ddp.local_device())


EXAMPLES = """examples:
  ppl-lvm demo                                      # the README's VAE on the bundled MNIST
  ppl-lvm train vae --data digits --epochs 20 --out runs/vae
  ppl-lvm evaluate runs/vae -K 1000                 # held-out log p(x) by IWAE
  ppl-lvm train vae --print-config > exp.toml       # every option, to edit and rerun:
  ppl-lvm train --config exp.toml --out runs/exp
  ppl-lvm COMMAND --help                            # a command's options and their defaults
"""


def build_parser():
    from ppl_lvm import __version__

    parser = Parser(prog="ppl-lvm", description=__doc__.split("\n\n")[0], epilog=EXAMPLES)
    parser.add_argument("--version", action="version",
                        version=f"ppl-lvm {__version__} (torch {torch.__version__}, "
                                f"pyro {pyro.__version__})")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser,
                                     metavar="COMMAND")

    p = commands.add_parser("train", help="fit a model (SVI) and write a run folder")
    p.add_argument("model", nargs="?", type=model_name, default=None,
                   help=f"required, here or in --config: one of {', '.join(experiment.BUILTIN)}, "
                        "or path/to/file.py:build for your own model (build(data_dim, **options) "
                        "returns an object with model and guide)")
    p.add_argument("--out", default=None,
                   help="required, here or in --config: the run folder to write (checkpoint, "
                        "weights, metrics, PNGs)")
    add_train_options(p, epochs=None)  # 50, or for mog fit_mixture's own caps
    add_common_options(p)
    p.set_defaults(func=train)

    p = commands.add_parser("evaluate", help="held-out log p(x) estimates for a trained run")
    p.add_argument("run", help="a folder written by `ppl-lvm train`")
    p.add_argument("--method", default="iwae", choices=list(METHODS),
                   help="; ".join(f"{name}: {m.help}" for name, m in METHODS.items() if m.help))
    p.add_argument("-K", "--num-samples", type=positive_int, default=None,
                   help=f"importance samples per image (default: {METHODS['iwae'].num_samples}), "
                        f"or AIS chains per image (default: {METHODS['ais'].num_samples}, each as "
                        "costly as T importance samples)")
    p.add_argument("-T", "--num-temperatures", "--num-steps", dest="num_steps", type=positive_int,
                   default=500, help="AIS temperatures (HMC transitions) per chain, for --method ais")
    p.add_argument("--n", type=positive_int, default=None,
                   help="only the first n held-out images (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the samples")
    add_compile_option(p.add_argument, "each chunk's log weights (with --method ais: the annealed density)")
    add_device_option(p)
    add_common_options(p)
    add_trust_option(p)
    p.set_defaults(func=evaluate)

    add_gaps_parser(commands)

    p = commands.add_parser("compare", help="runs side by side: held-out ELBO, IWAE log p(x), "
                                            "gaps, time; a PNG of their training curves")
    p.add_argument("runs", nargs="+", help="folders written by `ppl-lvm train`")
    p.add_argument("-K", "--num-samples", type=positive_int, default=1000,
                   help="importance samples per row for log p(x) (IWAE)")
    p.add_argument("--n", type=positive_int, default=200, help="the first n held-out rows")
    p.add_argument("--gaps", action="store_true", help="approximation and amortization gaps")
    p.add_argument("--local-steps", type=positive_int, default=300,
                   help="optimisation steps of each row's own q* (gaps, per-datapoint runs)")
    p.add_argument("--out", default="compare.png", help="the PNG to write (and a .json beside it)")
    p.add_argument("--seed", type=int, default=0, help="seed of the samples")
    add_device_option(p)
    add_common_options(p)
    add_trust_option(p)
    p.set_defaults(func=compare)

    p = commands.add_parser("bdmc", help="BDMC: AIS lower and reverse-AIS upper bounds of log p(x) "
                                         "on images simulated from a trained run")
    p.add_argument("run", help="a folder written by `ppl-lvm train`")
    p.add_argument("--n", type=positive_int, default=50, help="images to simulate")
    p.add_argument("-T", "--num-temperatures", "--num-steps", dest="num_steps", type=positive_int,
                   default=500, help="AIS temperatures (HMC transitions) per chain, each direction")
    p.add_argument("-K", "--num-samples", type=positive_int, default=4, help="chains per image")
    p.add_argument("--seed", type=int, default=0, help="seed of the simulation and the chains")
    add_compile_option(p.add_argument, "the annealed log-density and its gradient")
    add_device_option(p)
    add_common_options(p)
    add_trust_option(p)
    p.set_defaults(func=run_bdmc)

    p = commands.add_parser("demo", help="train the VAE on the bundled MNIST, evaluate it, draw it "
                                         "(a few minutes on a CPU)")
    p.add_argument("--out", default="runs/demo", help="the run folder to write")
    p.add_argument("--demo-samples", type=positive_int, default=500,
                   help="K of the demo's IWAE estimate of held-out log p(x)")
    add_train_options(p, epochs=200, demo=True)
    add_common_options(p)
    p.set_defaults(func=demo)

    add_complete_parser(commands)
    return parser


def subparser(parser, command):
    return parser._subparsers._group_actions[0].choices[command]


def parse_known(parser, argv):
    args, extras = parser.parse_known_args(argv)
    if extras and args.command == "demo" and any(
            extra.split("=")[0] in ("--" + name.replace("_", "-") for name in DEMO_FIXED)
            for extra in extras):
        raise CLIError(f"demo does not take {' '.join(extras)}: it trains the README's VAE "
                       "(amortized guide, ELBO) on the bundled MNIST; for other data, guides, "
                       "objectives, missing pixels or a model file use `ppl-lvm train`")
    if extras:
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    return args


def parse(parser, argv):
    """Parse ``argv``; with ``--config FILE`` the file's options become the defaults, so the
    command line overrides them."""
    args = parse_known(parser, argv)
    if getattr(args, "config", None):
        command = subparser(parser, args.command)
        allowed = {action.dest for action in command._actions} - {"help", "config", "print_config"}
        options = read_config_file(args.config, allowed if args.command != "train" else None)
        command.set_defaults(**typed_config(command, options, args.config))
        args = parse_known(parser, argv)
    if getattr(args, "print_config", False):
        return args
    if args.command == "train" and args.model is None:
        raise CLIError("train needs a model (vae, masked-vae, ppca, mog or path/to/file.py:build),"
                       " on the command line or in --config")
    if args.command == "train" and args.out is None:
        raise CLIError("train needs --out FOLDER (on the command line; a --config file does not "
                       "choose the folder)")
    return args


# what --config never takes from a file (which folder is written or deleted, whose code runs)
COMMAND_LINE_ONLY = ("out", "overwrite", "resume", "trust_code")
# not part of a command's configuration
NOT_CONFIG = ("func", "command", "config", "print_config", "debug", "verbose")


def print_config(parser, args):
    """The command's full resolved configuration as TOML: every option with its value (defaults,
    then --config, then the command line), which ``--config`` reads back."""
    import json

    command = subparser(parser, args.command)
    positional = {action.dest for action in command._actions if not action.option_strings}
    lines = [f"# ppl-lvm {args.command}: every option, resolved (defaults < --config < command "
             "line).", f"# Save it (ppl-lvm {args.command} ... --print-config > exp.toml), edit "
             f"it, and run `ppl-lvm {args.command} --config exp.toml`.",
             "# Options left at `None` (no value) are commented out."]
    for key, value in vars(args).items():
        if key in NOT_CONFIG:
            continue
        text = json.dumps(value, ensure_ascii=False)  # a TOML string, number, bool or array too
        if key in COMMAND_LINE_ONLY:
            lines.append(f"# {key} = {text}  (command line only: a file does not choose or "
                         "delete folders, or trust code)")
        elif value is None:
            lines.append(f"# {key} = ")
        elif key in positional and args.command != "train":
            lines.append(f"# {key} = {text}  (given on the command line)")
        else:
            lines.append(f"{key} = {text}")
    print("\n".join(lines))
    return 0


class _Stdout(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is when a record is emitted (pytest swaps it)."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def configure_logging(args):
    """Results and progress messages on stdout (levels: --quiet RESULT, default INFO, --verbose
    DEBUG); rank > 0 of a torchrun group says nothing."""
    for handler in list(logger.handlers):
        if getattr(handler, "ppl_lvm_cli", False):
            logger.removeHandler(handler)
    handler = _Stdout()
    handler.ppl_lvm_cli = True
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
    level = (logging.DEBUG if getattr(args, "verbose", False) else
             RESULT if getattr(args, "quiet", False) else logging.INFO)
    logger.setLevel(level if ddp.rank() == 0 else logging.ERROR)


def user_frame(error, files=()):
    """(file, line, function) of the innermost traceback frame in the user's own code: a model
    file, or any file outside ppl_lvm, the standard library and installed packages (the error
    itself, or the one it was raised from)."""
    chain = []
    while error is not None and error not in chain:  # the error, then what it was raised from
        chain.append(error)
        error = error.__cause__ or error.__context__
    for error in reversed(chain):
        found = _user_frame(error, files)
        if found is not None:
            return found
    return None


def _user_frame(error, files):
    import site
    import sysconfig
    import traceback

    package = str(Path(__file__).resolve().parent)
    system = [str(Path(p).resolve()) for p in
              {sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["purelib"],
               sysconfig.get_paths()["platlib"], *site.getsitepackages()}]
    found = None
    for frame in traceback.extract_tb(error.__traceback__):
        path = str(Path(frame.filename).resolve())
        if frame.filename.startswith("<") or path.startswith(package):
            continue
        if any(path.startswith(prefix) for prefix in system) and path not in files:
            continue
        found = (frame.filename, frame.lineno, frame.name)
    return found


def report(error, args):
    """One line for an error (the user's file and line where their code raised it)."""
    where = f" (rank {ddp.rank()})" if ddp.active() else ""
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    frame = None if isinstance(error, CLIError) else user_frame(error)
    if frame is not None:
        name = type(error).__name__
        message = (f"{frame[0]}:{frame[1]} (in {frame[2]}): {name}: {message} "
                   "(--debug for the traceback)")
    print(f"ppl-lvm: error{where}: {message}", file=sys.stderr)


EXPECTED = (CLIError, ValueError, OSError, DivergenceError, RuntimeError)

# PPL_LVM_SMOKE=1 shrinks every command to seconds (the tests run the README's commands so, as
# Pyro's tests smoke-run its examples): at most these epochs, samples, steps and rows
SMOKE_LIMITS = {"epochs": 1, "num_samples": 5, "num_steps": 5, "n": 20, "local_steps": 5,
                "elbo_samples": 5, "demo_samples": 5, "num_particles": 2, "inner_steps": 2}


def smoke(args):
    if os.environ.get("PPL_LVM_SMOKE", "") in ("", "0"):
        return
    for key, limit in SMOKE_LIMITS.items():
        if hasattr(args, key):
            value = getattr(args, key)
            setattr(args, key, limit if value is None and key in ("n", "num_samples") else
                    value if value is None else min(value, limit))
    logger.warning("PPL_LVM_SMOKE is set: epochs, samples, steps and rows cut to "
                   f"{SMOKE_LIMITS} at most")


def check_run_folder(run):
    """A folder written by ``train`` (checked before any work, so that a command over several
    runs fails at once)."""
    run = Path(run)
    if not run.is_dir():
        raise CLIError(f"{run} not found: is it a folder written by `ppl-lvm train`?")
    if not (run / "model.pt").is_file():
        raise CLIError(f"{run / 'model.pt'} not found: is {run} a folder written by `ppl-lvm "
                       "train` (and did it finish)?")


def check_arguments(args):
    """Every path a command names exists, before it loads data or computes anything."""
    for run in getattr(args, "runs", None) or [getattr(args, "run", None)]:
        if run is not None:
            check_run_folder(run)
    if args.command in ("train", "demo"):
        model = str(getattr(args, "model", "") or "")
        if ".py" in model and not Path(model.partition(":")[0]).is_file():
            raise CLIError(f"model file {model.partition(':')[0]} not found (give "
                           "path/to/file.py:build)")
        if args.data_path is not None and not Path(args.data_path).exists():
            raise CLIError(f"--data-path {args.data_path} not found")
        if Path(args.out).exists() and not Path(args.out).is_dir():
            raise CLIError(f"--out {args.out} is a file, not a folder")
        check_combination(args) if args.command == "train" else None


def main(argv=None):
    parser = build_parser()
    args = None
    try:
        args = parse(parser, argv)
        if getattr(args, "print_config", False):
            return print_config(parser, args)
        if getattr(args, "device", "cpu") == "cuda" and not torch.cuda.is_available():
            raise CLIError("--device cuda was asked for but CUDA is not available on this machine")
        check_arguments(args)
        join_torchrun(args)
        configure_logging(args)
        smoke(args)
        count = threads.set_threads(getattr(args, "threads", None))
        logger.debug(f"torch uses {count} CPU thread(s) (--threads to choose)")
        with bars.shown(not getattr(args, "quiet", False)):
            args.func(args)
    except KeyboardInterrupt:
        print("ppl-lvm: interrupted; rerun with --resume to continue from the last checkpoint",
              file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001: one line for the user, the traceback with --debug
        if getattr(args, "debug", False):
            raise
        if not isinstance(error, EXPECTED) and user_frame(error) is None:
            raise  # a bug in ppl_lvm itself: the traceback is what a report needs
        report(error, args)
        return 2
    finally:
        if ddp.active():
            ddp.dist.destroy_process_group()
    return 0
