"""An experiment from options: which model, which guide (amortized, per-datapoint or
semi-amortized), which objective (ELBO or IWAE-K), missing pixels, the two-step procedure, a step
schedule — the one code path that ``ppl-lvm train`` and a Python user share. A user's own model
comes from a file: ``path/to/file.py:build`` where ``build(data_dim, **options)`` returns an
object with ``model`` and ``guide`` (an ``nn.Module`` such as ``VAE``, or any object).
"""
import dataclasses
import importlib.util
import sys
from pathlib import Path

import pyro
import torch
from pyro.infer import Trace_ELBO

from ppl_lvm import atomic
from ppl_lvm.guides import LocalGuide, SemiAmortizedGuide
from ppl_lvm.models.missing import MASKS, MaskedVAE, make_mask
from ppl_lvm.models.mog import COVARIANCES, MixtureOfGaussians
from ppl_lvm.models.ppca import PPCA
from ppl_lvm.models.vae import VAE
from ppl_lvm.objectives import IWAE_ELBO
from ppl_lvm.program import inspect_program
from ppl_lvm.recipes import infer_local

OBJECTIVES = ("elbo", "iwae")
USER_FILE = "user_model.py"  # the run folder's copy of a user's model file


def ppca(data_dim, z_dim=20, **_):
    """A PPCA to be trained: W small and random, b = 0, σ = 1 (the CLI's ``ppca``)."""
    weight = 0.1 * torch.randn(data_dim, z_dim, generator=torch.Generator().manual_seed(0))
    module = PPCA(weight, torch.zeros(data_dim), 1.0)
    module.config = lambda: {"data_dim": data_dim, "z_dim": z_dim}
    return module


def _vae(data_dim, options):
    return VAE(data_dim, z_dim=options["z_dim"], hidden_dim=options["hidden_dim"],
               likelihood=options["likelihood"])


def _masked_vae(data_dim, options):
    return MaskedVAE(data_dim, z_dim=options["z_dim"], hidden_dim=options["hidden_dim"],
                     likelihood=options["likelihood"])


def _ppca(data_dim, options):
    return ppca(data_dim, z_dim=options["z_dim"])


def _mog(data_dim, options):
    if options.get("covariance", "diag") not in COVARIANCES:
        raise ValueError(f"--covariance must be one of {COVARIANCES}")
    return MixtureOfGaussians(options["components"], data_dim, options.get("covariance", "diag"))


# the model kinds `ppl-lvm train MODEL` builds: name -> build(data_dim, options) -> module
MODELS = {"vae": _vae, "masked-vae": _masked_vae, "ppca": _ppca, "mog": _mog}
BUILTIN = tuple(MODELS)


def builtin_module(name, data_dim, options):
    """The package's model ``name`` for rows of ``data_dim`` values, from the CLI's options."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {BUILTIN} or "
                         "path/to/file.py:build")
    return MODELS[name](data_dim, options)


def read_model_file(path):
    """The bytes of a model file; a missing file or a folder is one clear line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file {path} not found (give path/to/file.py:build)")
    return path.read_bytes()


def load_builder(spec, copy_to=None, source=None):
    """``build`` from ``"path/to/file.py:build"`` (the function after the colon; default ``build``).

    copy_to: a run folder to keep a copy of the file in (``USER_FILE``, written atomically and
    never through a link), so the run can be evaluated later even if the file changes or moves.
    source: the file's bytes when already read (and checked): exactly these run, and are copied.
    """
    path, _, name = str(spec).partition(":")
    name = name or "build"
    path = Path(path)
    if source is None:
        source = read_model_file(path)
    module_name = f"ppl_lvm_user_model_{abs(hash(str(path.resolve())))}"
    loader = importlib.util.spec_from_loader(module_name, loader=None, origin=str(path))
    module = importlib.util.module_from_spec(loader)
    module.__file__ = str(path)
    sys.modules[module_name] = module
    try:
        exec(compile(source, str(path), "exec"), module.__dict__)
    except Exception as error:
        line = _user_line(error, path)
        raise ValueError(f"model file {path} failed to import{line}: {type(error).__name__}: "
                         f"{error}") from error
    builder = getattr(module, name, None)
    if not callable(builder):
        raise ValueError(f"model file {path} has no function {name!r} (define "
                         f"{name}(data_dim, **options) returning an object with model and guide)")
    if copy_to is not None:
        Path(copy_to).mkdir(parents=True, exist_ok=True)
        target = Path(copy_to) / USER_FILE
        if path.resolve() != target.resolve():
            atomic.atomic_write(target, source)
    return builder


def _user_line(error, path):
    """" (line N)" of the innermost frame of ``error``'s traceback in the user's file, if any."""
    line = getattr(error, "lineno", None) if isinstance(error, SyntaxError) else None
    tb = error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == str(path):
            line = tb.tb_lineno
        tb = tb.tb_next
    return "" if line is None else f" (line {line})"


def user_module(spec, data_dim, options, copy_to=None, source=None):
    """The object ``build(data_dim, **options)`` of a user's model file returns (an exception
    raised inside build propagates as it is: the CLI names the file, function and line)."""
    builder = load_builder(spec, copy_to, source)
    try:
        built = builder(data_dim, **options)
    except TypeError as error:
        if error.__traceback__.tb_next is not None:  # raised inside build: as it is
            raise
        path, _, name = str(spec).partition(":")
        raise ValueError(f"model file {path}: {name or 'build'}(data_dim, **{options}) cannot "
                         f"be called ({error}): check the --option names") from error
    if not (callable(getattr(built, "model", None)) and callable(getattr(built, "guide", None))):
        raise ValueError(f"{spec} returned {type(built).__name__}, which has no model and guide "
                         "methods")
    return built


def is_builtin(name):
    return name in BUILTIN


@dataclasses.dataclass(frozen=True)
class GuideKind:
    """A guide kind ``ppl-lvm train --guide`` offers: ``build(module, num_data, data, options)``
    returns the guide for ``module``'s model; ``help`` is its line in ``--help``.

    per_datapoint: it holds one φ_i per training row, so held-out rows get their own φ fitted with
        the model frozen (``infer_local``), there is no held-out ELBO during training, no gaps of
        an encoder, and ``--inner-steps`` applies. amortized: q(z | x) is the model's encoder
        itself (``compare --gaps`` measures its amortization gap). needs_encoder: it refines an
        encoder of x alone (``train vae`` only).
    """

    build: object
    help: str
    per_datapoint: bool = False
    amortized: bool = False
    needs_encoder: bool = False


def _amortized(module, num_data, data, options):
    return getattr(module, "guide", None)  # a mixture scored exactly has none


def _local(module, num_data, data, options):
    structure = inspect_program(module.model, *data)
    shapes = {n: structure.event_shapes[n] for n in structure.local_latents}
    return LocalGuide(num_data, shapes, plate_name=structure.plate_name)


def _semi_amortized(module, num_data, data, options):
    encoder = getattr(module, "encoder", None)
    if encoder is None:
        raise ValueError("--guide semi-amortized refines an encoder's output: the model has "
                         "no .encoder")
    return SemiAmortizedGuide(module.model, encoder, steps=options.get("semi_steps", 5))


# the guide kinds: a new one is a guide class (its own file) and one entry here
GUIDE_KINDS = {
    "amortized": GuideKind(_amortized, "the model's encoder q(z | x)", amortized=True),
    "local": GuideKind(_local, "one φ_i per training row (non-amortized SVI)",
                       per_datapoint=True),
    "semi-amortized": GuideKind(_semi_amortized, "the encoder's output refined by --semi-steps "
                                "steps", needs_encoder=True),
}
GUIDES = tuple(GUIDE_KINDS)


def guide_kind(kind):
    """The ``GuideKind`` named ``kind`` (a run written before a kind was renamed reads as
    amortized, as it always did)."""
    return GUIDE_KINDS.get(kind, GUIDE_KINDS["amortized"])


def make_guide(kind, module, num_data, data, options):
    """The guide of ``kind`` (one of ``GUIDE_KINDS``) for ``module``'s model: its own amortized
    guide, a per-datapoint ``LocalGuide`` over the model's local latent sites (read from its
    trace), or the amortized guide refined by S steps (``SemiAmortizedGuide``, needs
    ``module.encoder``)."""
    if kind not in GUIDE_KINDS:
        raise ValueError(f"unknown guide {kind!r}; choose one of {GUIDES}")
    return GUIDE_KINDS[kind].build(module, num_data, data, options)


def make_loss(objective, num_particles=1, dreg=False):
    if objective == "elbo":
        return Trace_ELBO(num_particles=num_particles, vectorize_particles=num_particles > 1)
    if objective == "iwae":
        return IWAE_ELBO(num_particles, dreg=dreg)
    raise ValueError(f"unknown objective {objective!r}; choose one of {OBJECTIVES}")


def parse_missing(text, num_rows, data_dim, seed=0, device=None):
    """``--missing top_half`` or ``mcar:0.5`` -> a [N, D] bool mask (True = observed)."""
    name, options = parse_missing_text(text)
    return make_mask(name, num_rows, data_dim, seed=seed, device=device, **options)


def parse_missing_text(text):
    """``--missing``'s mask name and options: ``mcar:RATE`` needs its rate in [0, 1); no other
    mask takes one (``top_half:3`` is refused, not read as top_half)."""
    name, colon, rate = str(text).partition(":")
    if name not in MASKS:
        raise ValueError(f"--missing {text!r}: unknown mask {name!r}; choose one of {MASKS} "
                         "(mcar as mcar:RATE)")
    if name == "mcar":
        try:
            value = float(rate)
        except ValueError:
            raise ValueError(f"--missing {text!r}: mcar needs its missing rate, a number in "
                             "[0, 1), e.g. mcar:0.5") from None
        if not 0 <= value < 1:
            raise ValueError(f"--missing {text!r}: the mcar rate must be in [0, 1), got {value}")
        return name, {"rate": value}
    if colon:
        raise ValueError(f"--missing {text!r}: {name} takes no rate (only mcar:RATE does)")
    return name, {}


def held_out_guide(kind, module, model, guide, x_test, data_kwargs, steps=300, lr=1e-2):
    """The guide to score held-out rows with: a per-datapoint guide has no φ for them, so they
    are fitted with the model frozen (``infer_local``); returns (guide, keywords for the
    estimators, a note for the user)."""
    if not guide_kind(kind).per_datapoint:
        return guide, {}, ""
    pyro.set_rng_seed(0)
    fitted = infer_local(model, x_test, num_steps=steps, lr=lr, name="held_out", **data_kwargs)
    return fitted, {"idx": torch.arange(len(x_test), device=x_test.device)}, (
        f" (a per-datapoint guide: held-out φ fitted by infer_local, {steps} steps, model frozen)")


def gap_encoder(module, guide, x):
    """x -> (loc, scale) for the one local latent site, to start the per-datapoint q* of the gaps
    from: a package VAE's own encoder; for any other guide, the loc and scale of the Normal it
    samples at that site (read from its trace, whatever the site's name), or the prior's N(0, 1)
    when it samples something else. None when the model has several local latent sites."""
    from pyro import poutine
    from pyro.distributions import Independent, Normal

    if isinstance(module, VAE):
        return module.encoder
    structure = inspect_program(module.model, x[:2])
    if len(structure.local_latents) != 1:
        return None
    site = structure.local_latents[0]

    def encoder(rows):
        with torch.no_grad(), poutine.block():
            fn = poutine.trace(guide).get_trace(rows).nodes[site]["fn"]
        while isinstance(fn, Independent):
            fn = fn.base_dist
        if isinstance(fn, Normal):
            return fn.loc.detach(), fn.scale.detach()
        shape = (len(rows), *structure.event_shapes[site])
        return rows.new_zeros(shape), rows.new_ones(shape)

    return encoder
