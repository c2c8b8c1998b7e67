"""The command line: `ppl-lvm train | evaluate | gaps | bdmc | complete | demo` (or `python -m ppl_lvm`).

Bad names, paths and option values end in one line `ppl-lvm: error: ...`, never a traceback.
"""
import argparse
import os
import sys
import time
from pathlib import Path

import torch

from ppl_lvm import data as datasets
from ppl_lvm import distributed as ddp
from ppl_lvm import atomic, plots
from ppl_lvm.checkpoint import check_epochs, load_checkpoint
from ppl_lvm.runs import MODELS, RunLock, load_run, prepare_run_folder, run_data, save_run
from ppl_lvm.train import CHECKPOINT_NAME, DivergenceError, evaluate_elbo, fit


class CLIError(Exception):
    """An error for the user: printed as one line."""


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise CLIError(f"{message} (see `{self.prog} --help`)")


def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_float(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def add_train_options(parser, epochs):
    parser.add_argument("--data", default="mnist", choices=sorted(datasets.DATASETS),
                        help="bundled data set (mnist: 5,000 real MNIST digits; digits: sklearn 8x8)")
    parser.add_argument("--data-path", default=None,
                        help="a folder of MNIST IDX files (gzipped or not) or an .npz, instead of the bundled set")
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--batch-size", type=positive_int, default=128)
    parser.add_argument("--lr", type=positive_float, default=1e-3)
    parser.add_argument("--z-dim", type=positive_int, default=20)
    parser.add_argument("--hidden-dim", type=positive_int, default=400)
    parser.add_argument("--likelihood", default="bernoulli", choices=["bernoulli", "gaussian"])
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--eval-every", type=positive_int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run OUT already holds (its files are deleted first)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def train(args):
    """Fit a model to a data set and write weights, metrics and pictures into ``args.out``."""
    if args.epochs < 0:
        raise CLIError(f"--epochs must be >= 0, got {args.epochs}")
    if not 0 < args.test_fraction < 1:
        raise CLIError(f"--test-fraction must be in (0, 1), got {args.test_fraction}")
    out = Path(args.out)
    # absolute, so that `evaluate` run from another folder finds the same data
    data_path = None if args.data_path is None else os.path.abspath(args.data_path)
    data_config = {"name": args.data, "path": data_path, "test_fraction": args.test_fraction,
                   "split_seed": args.seed, "binarize": args.likelihood == "bernoulli"}
    x_train, x_test = run_data(data_config, args.device)
    if not ddp.is_main():
        return train_in(args, out, data_config, x_train, x_test)
    with RunLock(out):  # before the folder is judged: a run writing it now holds it
        prepare_run_folder(out, resume=args.resume, overwrite=args.overwrite)
        if args.resume and (out / CHECKPOINT_NAME).is_file():
            check_epochs(load_checkpoint(out / CHECKPOINT_NAME, "cpu"), out / CHECKPOINT_NAME,
                         args.epochs)
        return train_in(args, out, data_config, x_train, x_test)


def train_in(args, out, data_config, x_train, x_test):
    """``train`` once the run folder is checked (and, on rank 0, locked)."""
    torch.manual_seed(args.seed)
    vae = MODELS[args.model](x_train.shape[1], z_dim=args.z_dim, hidden_dim=args.hidden_dim,
                             likelihood=args.likelihood)
    binarize = (lambda x: torch.bernoulli(x)) if data_config["binarize"] else None
    say = (lambda *a: None) if args.quiet or not ddp.is_main() else print
    say(f"training {args.model} on {args.data}: {len(x_train)} train / {len(x_test)} held-out "
        f"images of {x_train.shape[1]} pixels, {args.epochs} epochs on {args.device}")
    start = time.perf_counter()
    result = fit(vae.model, vae.guide, x_train, epochs=args.epochs, batch_size=args.batch_size,
                 lr=args.lr, device=args.device, seed=args.seed, progress=not args.quiet,
                 eval_data=x_test, eval_every=args.eval_every, checkpoint_dir=out,
                 resume=args.resume, transform=binarize)
    elbo = evaluate_elbo(vae.model, vae.guide, x_test, num_particles=10, distributed=ddp.active())
    metrics = {"heldout_elbo": elbo, "train_loss": result.epoch_losses[-1] if result.epoch_losses else None,
               "epochs": args.epochs, "steps": result.step, "wall_time_s": time.perf_counter() - start,
               "eval_epochs": result.eval_epochs, "eval_elbos": result.eval_elbos,
               "epoch_losses": result.epoch_losses}
    if not ddp.is_main():  # the global params are the same on every rank: rank 0 writes them
        return metrics
    save_run(out, args.model, vae, {"data": data_config, "train": {
        k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "seed")}}, metrics)
    write_pictures(vae, x_test, result, out)
    print(f"held-out ELBO: {elbo:.2f} nats/image ({len(x_test)} images, 10 samples each); "
          f"{metrics['wall_time_s']:.0f} s; wrote {out}")
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


def evaluate(args):
    """Held-out per-datapoint estimates of log p(x) for a trained run (``log_marginal``)."""
    from ppl_lvm.estimators import LogMarginalEstimate, estimate_log_marginal

    vae, config = load_run(args.run, args.device)
    _, x_test = run_data(config["data"], args.device)
    if args.n is not None:
        x_test = x_test[:args.n]
    start = time.perf_counter()
    options = dict(method=args.method, num_samples=args.num_samples, seed=args.seed)
    if args.method == "ais":
        options["num_steps"] = args.num_steps
    if ddp.active():  # rows split across ranks, gathered back in order
        log_px = ddp.log_marginal(vae.model, vae.guide, x_test, **options)
        estimate = LogMarginalEstimate(log_px, torch.full_like(log_px, float("nan")),
                                       args.method, args.num_samples)
    else:
        estimate = estimate_log_marginal(vae.model, vae.guide, x_test, **options)
    seconds = time.perf_counter() - start
    unreliable = None if estimate.khat is None else int(estimate.unreliable.sum())
    result = {"method": args.method, "num_samples": args.num_samples, "num_images": len(x_test),
              "mean": estimate.mean, "stderr": estimate.stderr,
              "median_ess": estimate.ess.median().item(), "wall_time_s": seconds,
              "khat_above_0.7": unreliable}
    if args.method == "ais":
        result["num_steps"] = args.num_steps
    if ddp.is_main():
        ess = "" if args.method == "exact" or ddp.active() else f"; median ESS {result['median_ess']:.1f}"
        if unreliable is not None and args.method != "ais" and args.num_samples >= 25:
            ess += f"; Pareto k̂ > 0.7 (not to be trusted) for {unreliable} images"
        steps = f", T={args.num_steps}" if args.method == "ais" else ""
        print(f"held-out log p(x) by {args.method}, K={args.num_samples}{steps}: {estimate.mean:.2f} ± "
              f"{estimate.stderr:.2f} nats/image ({len(x_test)} images{ess}; {seconds:.1f} s)")
        name = f"evaluate_{args.method}_K{args.num_samples}" + (
            f"_T{args.num_steps}" if args.method == "ais" else "")
        path = Path(args.run) / f"{name}.json"
        atomic.write_json(path, result)
    return result


def run_bdmc(args):
    """The BDMC sandwich on images simulated from a trained run's model (Grosse et al. 2015)."""
    from ppl_lvm.ais import bdmc

    module, _ = load_run(args.run, args.device)
    start = time.perf_counter()
    result = bdmc(module.model, module.guide, num_data=args.n, data_shape=(module.data_dim,),
                  device=args.device, num_steps=args.num_steps, num_samples=args.num_samples,
                  seed=args.seed)
    seconds = time.perf_counter() - start
    summary = {"num_images": args.n, "num_steps": args.num_steps, "num_samples": args.num_samples,
               "lower": result.lower.mean().item(), "upper": result.upper.mean().item(),
               "gap": result.gap.mean().item(), "wall_time_s": seconds}
    print(f"BDMC on {args.n} simulated images, T={args.num_steps}, K={args.num_samples}: "
          f"{summary['lower']:.2f} <= log p(x) <= {summary['upper']:.2f} nats/image "
          f"(gap {summary['gap']:.2f}; {seconds:.1f} s)")
    atomic.write_json(Path(args.run) / f"bdmc_T{args.num_steps}_K{args.num_samples}.json", summary)
    return summary


def gaps(args):
    """Approximation and amortization gaps (Cremer et al. 2018) of a trained run on held-out images."""
    from ppl_lvm.guides import amortization_gaps

    vae, config = load_run(args.run, args.device)
    _, x_test = run_data(config["data"], args.device)
    x_test = x_test[:args.n]
    print(f"gaps of {args.run} on {len(x_test)} held-out images: q* by {args.local_steps} steps "
          f"per image, log p(x) by IWAE with K={args.num_samples}")
    start = time.perf_counter()
    result = amortization_gaps(vae.model, vae.guide, x_test, num_samples=args.num_samples,
                               elbo_samples=args.elbo_samples, local_steps=args.local_steps,
                               local_lr=args.local_lr, seed=args.seed)
    summary = {**result.summary(), "local_steps": args.local_steps,
               "wall_time_s": time.perf_counter() - start}
    atomic.write_json(Path(args.run) / "gaps.json", summary)
    print(result)
    print(f"wrote {Path(args.run) / 'gaps.json'}")
    return summary


def add_gaps_parser(commands):
    p = commands.add_parser("gaps", help="approximation and amortization gaps of a trained run")
    p.add_argument("run", help="a folder written by `ppl-lvm train`")
    p.add_argument("-K", "--num-samples", type=positive_int, default=5000,
                   help="importance samples for log p(x) (IWAE)")
    p.add_argument("--n", type=positive_int, default=200, help="the first n held-out images")
    p.add_argument("--elbo-samples", type=positive_int, default=100)
    p.add_argument("--local-steps", type=positive_int, default=300,
                   help="optimisation steps of each image's own q* (decoder frozen)")
    p.add_argument("--local-lr", type=positive_float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.set_defaults(func=gaps)


def demo(args):
    """Train the VAE on the bundled MNIST for a few minutes and write its numbers and pictures."""
    args.model, args.data, args.data_path = "vae", "mnist", None
    return train(args)


def complete(args):
    """Complete held-out images of a trained run from the posterior p(x_miss | x_obs); write a PNG grid.

    Rows: the originals, the observed pixels (missing ones grey), then ``--samples`` completions.
    A plain VAE's encoder never saw missing pixels: q(z | zero-filled x) is a poor proposal, so its
    Metropolis-within-Gibbs chains propose z from q(z | x_obs and the current completion), a full
    image like those it was trained on (Rezende et al. 2014); a MaskedVAE proposes from q(z | x_obs).
    """
    from ppl_lvm.models import missing

    module, config = load_run(args.run, args.device)
    proposal = "observed" if isinstance(module, missing.MaskedVAE) else "completed"
    if not isinstance(module, missing.MaskedVAE):
        plain = module
        module = missing.MaskedVAE(**plain.config(), encoder_sees_mask=False).to(args.device)
        module.load_state_dict(plain.state_dict())
    module = module.eval()
    _, x_test = run_data(config["data"], args.device)
    x = x_test[:args.n]
    mask = missing.make_mask(args.mask, x.shape[0], x.shape[1], rate=args.rate,
                             block_size=args.block_size, seed=args.seed, device=x.device)
    result = missing.complete(module.model, module.guide, x, mask, num_samples=args.samples,
                              method=args.method, num_particles=args.num_particles,
                              num_steps=args.num_steps, proposal=proposal, seed=args.seed)
    # each completion drawn as E[x_miss | z_s] beside the observed pixels: smoother to read than
    # the Bernoulli draws themselves (result.samples), which carry the same z_s
    shown = torch.where(mask, x, result.sample_means).clamp(0, 1)
    observed = torch.where(mask, x, torch.full_like(x, 0.5))
    out = completion_path(args.out, args.run, args.mask)
    out.parent.mkdir(parents=True, exist_ok=True)
    labels = ["original", "observed"] + [f"sample {i + 1}" for i in range(args.samples)]
    plots.image_grid([x, observed, *shown], out, row_labels=labels,
                     title=f"{args.mask}: completions E[x_miss | z_s], z_s ~ p(z | x_obs) ({args.method})")
    scores = missing.imputation_scores(x, mask, result.mean,
                                       binary=module.likelihood == "bernoulli")
    print(f"completed {x.shape[0]} images ({args.mask}, {int((~mask).sum())} missing pixels) by "
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
    from ppl_lvm.models.missing import COMPLETION_METHODS, MASKS

    p = commands.add_parser("complete", help="complete images with missing pixels (PNG grid)")
    p.add_argument("run", help="a folder written by `ppl-lvm train`")
    p.add_argument("--mask", default="top_half", choices=MASKS, help="which pixels are missing")
    p.add_argument("--n", type=positive_int, default=16, help="the first n held-out images")
    p.add_argument("--samples", type=positive_int, default=4, help="completions per image")
    p.add_argument("--method", default="mwg", choices=COMPLETION_METHODS,
                   help="sampling-importance-resampling or Metropolis-within-Gibbs")
    p.add_argument("--num-particles", type=positive_int, default=1000, help="K for SIR")
    p.add_argument("--num-steps", type=positive_int, default=200, help="MwG steps")
    p.add_argument("--rate", type=float, default=0.5, help="missing rate for --mask mcar")
    p.add_argument("--block-size", type=positive_int, default=14, help="side for --mask blocks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="PNG path (default RUN/completions_MASK.png)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
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


def build_parser():
    parser = Parser(prog="ppl-lvm", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = commands.add_parser("train", help="fit a model (SVI) and write a run folder")
    p.add_argument("model", choices=sorted(MODELS))
    p.add_argument("--out", required=True, help="run folder to write (checkpoint, weights, PNGs)")
    add_train_options(p, epochs=50)
    p.set_defaults(func=train)

    p = commands.add_parser("evaluate", help="held-out log p(x) estimates for a trained run")
    p.add_argument("run", help="a folder written by `ppl-lvm train`")
    p.add_argument("--method", default="iwae", choices=["iwae", "elbo", "prior", "is", "ais"],
                   help="iwae: the importance-weighted bound with q(z | x); elbo: Jensen's bound; "
                        "prior: naive Monte Carlo with z ~ p(z); ais: annealed importance sampling "
                        "from q(z | x), K chains of T HMC steps (a tighter lower bound)")
    p.add_argument("-K", "--num-samples", type=positive_int, default=1000)
    p.add_argument("-T", "--num-steps", type=positive_int, default=500,
                   help="AIS temperatures (HMC transitions) per chain, for --method ais")
    p.add_argument("--n", type=positive_int, default=None, help="only the first n held-out images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.set_defaults(func=evaluate)

    add_gaps_parser(commands)

    p = commands.add_parser("bdmc", help="BDMC: AIS lower and reverse-AIS upper bounds of log p(x) "
                                         "on images simulated from a trained run")
    p.add_argument("run", help="a folder written by `ppl-lvm train`")
    p.add_argument("--n", type=positive_int, default=50, help="images to simulate")
    p.add_argument("-T", "--num-steps", type=positive_int, default=500)
    p.add_argument("-K", "--num-samples", type=positive_int, default=4, help="chains per image")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.set_defaults(func=run_bdmc)

    p = commands.add_parser("demo", help="train the VAE on the bundled MNIST (a few minutes on CPU)")
    p.add_argument("--out", default="runs/demo")
    add_train_options(p, epochs=200)
    p.set_defaults(func=demo)

    add_complete_parser(commands)
    return parser


def main(argv=None):
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if getattr(args, "device", "cpu") == "cuda" and not torch.cuda.is_available():
            raise CLIError("--device cuda was asked for but CUDA is not available on this machine")
        join_torchrun(args)
        args.func(args)
    except (CLIError, ValueError, OSError, DivergenceError, RuntimeError) as error:
        where = f" (rank {ddp.rank()})" if ddp.active() else ""
        print(f"ppl-lvm: error{where}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ppl-lvm: interrupted; rerun with --resume to continue from the last checkpoint",
              file=sys.stderr)
        return 130
    finally:
        if ddp.active():
            ddp.dist.destroy_process_group()
    return 0
