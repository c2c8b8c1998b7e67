"""Claim: on a briefly trained MNIST VAE, AIS from the encoder gives a higher (tighter) held-out
log p(x) than IWAE-K at matched compute, and BDMC on simulated images bounds the error of both.

Held-out images: log p(x) by IWAE-K (K = 10 ... 30,000 samples from q(z | x)) and by AIS-T from
q(z | x) (K = 4 chains, T temperatures, L = 5 leapfrog steps: about K·T·L gradient evaluations per
image), against time and the number of model evaluations per image (AIS's count a forward and a
backward pass). Then BDMC on images simulated from the VAE: forward AIS (lower) and reverse AIS from the
exact posterior sample (upper) sandwich the true log p(x); IWAE-K on the same images must fall
below the upper bound. k̂ (PSIS) says when the IWAE weights are not to be trusted.

    python benchmarks/bench_ais.py            # trains a VAE for 20 epochs first (~10 s on CPU)
    python benchmarks/bench_ais.py --quick    # 1 epoch, 30 images, T ≤ 100, K ≤ 1,000 (~20 s)

On a CPU shared with other jobs, run with OMP_NUM_THREADS=1: AIS is a long sequence of small ops,
and a second intra-op thread waiting for a busy core made them ~10× slower here.

Last full run (CPU, OMP_NUM_THREADS=1 on a 2-core machine shared with other jobs, torch 2.13,
pyro 1.9.2; about 2.5 minutes in all):

    VAE(784, z=20, hidden=400) trained 20 epochs on 4500 bundled MNIST images in 8 s; 50 held-out
    images on cpu, torch 2.13.0+cpu, pyro 1.9.2

    held-out images: IWAE-K vs AIS-T (K = 4 chains, L = 5 leapfrog steps, from q(z | x))
    method                  evals/image  seconds  log p(x)   ± se median k̂ k̂>0.7
    ------------------------------------------------------------------------------
    IWAE K=10                        10     0.01   -114.94   4.66         —      —
    IWAE K=100                      100     0.07   -113.68   4.64      1.04    90%
    IWAE K=1000                    1000     0.88   -112.68   4.58      1.10   100%
    IWAE K=10000                  10000     9.25   -112.60   4.58         —      —
    IWAE K=30000                  30000    27.58   -112.53   4.59         —      —
    AIS T=10                        184     0.27   -112.81   4.61   (acceptance 0.96)
    AIS T=100                      1984     2.81   -112.11   4.62   (acceptance 0.78)
    AIS T=500                      9984    13.92   -112.01   4.62   (acceptance 0.67)
    AIS T=500 from p(z)            9984    11.83   -112.30   4.62
    (importance sampling from p(z), K=1000: k̂ > 0.7 for 100% of images)

    BDMC on 50 images simulated from the VAE (K = 4 chains, L = 5)
         T     lower     upper     gap  seconds  IWAE-10000  IWAE - lower
    ---------------------------------------------------------------------
        10   -126.84   -125.35    1.49     0.51     -126.82          0.03
       100   -126.26   -126.06    0.20     6.08     -126.82         -0.56
       500   -126.12   -126.00    0.12    31.91     -126.82         -0.70

Read: at matched model evaluations AIS T = 500 beats IWAE-10,000 by 0.6 nats (AIS's evaluations
carry a backward pass: ~1.5× IWAE's time); at matched time AIS T = 100 (2.8 s) beats IWAE-1,000
(0.9 s) and IWAE-10,000 (9.3 s), and IWAE-30,000 (27.6 s) by 0.4 nats. AIS T = 10 (184
evaluations, 0.3 s) is within 0.3 nats of IWAE-30,000. The
IWAE weights have k̂ > 0.7 on every image from K = 1,000: their log-mean is not to be trusted, and
on simulated images BDMC shows it: IWAE-10,000 sits 0.7 nats below the lower bound of AIS T = 500,
whose sandwich is 0.12 nats wide. AIS from the prior needs more steps than from the encoder.
"""
import argparse
import sys
import time
from pathlib import Path

import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, not installed
from ppl_lvm import VAE, binarize, fit, load_mnist, train_test_split  # noqa: E402
from ppl_lvm.ais import ais_log_marginal, bdmc  # noqa: E402
from ppl_lvm import densities  # noqa: E402
from ppl_lvm.estimators import estimate_log_marginal, vectorize  # noqa: E402
from ppl_lvm.psis import pareto_khat  # noqa: E402


@torch.no_grad()
def importance_log_weights(vae, x, num_samples, guide=True, rows=25):
    """log w [K, N]: log p(x, z) - log q(z | x), z ~ q (or log p(x | z), z ~ p(z) without guide)."""
    out = []
    for x_rows in x.split(rows):
        model = vectorize(vae.model, num_samples, 1, x.device)
        proposal = vectorize(vae.guide, num_samples, 1, x.device) if guide else None
        guide_trace, model_trace = densities.trace_pair(model, proposal, (x_rows,))
        out.append(densities.row_log_weights(model_trace, guide_trace, "data", len(x_rows), 1,
                                             observed_only=not guide))
    return torch.cat(out, -1)


def timed(fn, device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 epoch, 30 images, small T and K")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--num-images", type=int, default=None)
    args = parser.parse_args()
    if args.quick:
        args.epochs = min(args.epochs, 1)
    num_images = args.num_images or (30 if args.quick else 50)
    iwae_ks = [10, 100, 1000] if args.quick else [10, 100, 1000, 10000, 30000]
    ais_ts = [10, 100] if args.quick else [10, 100, 500]
    chains, leapfrog = 4, 5
    sim_k = 1000 if args.quick else 10000

    x, _ = load_mnist(device=args.device)
    x_train, x_test = train_test_split(x, test_fraction=0.1, seed=0)
    x_test = binarize(x_test[:num_images], method="stochastic", seed=0)
    vae = VAE(x.shape[1], z_dim=20, hidden_dim=400)
    (_, train_s) = timed(lambda: fit(
        vae.model, vae.guide, x_train, epochs=args.epochs, batch_size=100, lr=1e-3,
        device=args.device, seed=0, progress=False,
        transform=lambda batch: binarize(batch, method="stochastic")), args.device)
    vae.eval()
    print(f"VAE(784, z=20, hidden=400) trained {args.epochs} epochs on {len(x_train)} bundled "
          f"MNIST images in {train_s:.0f} s; {num_images} held-out images on {args.device}, "
          f"torch {torch.__version__}, pyro {pyro.__version__}\n")

    header = (f"{'method':<22} {'evals/image':>12} {'seconds':>8} {'log p(x)':>9} {'± se':>6} "
              f"{'median k̂':>9} {'k̂>0.7':>6}")
    print("held-out images: IWAE-K vs AIS-T (K = 4 chains, L = 5 leapfrog steps, from q(z | x))")
    print(header)
    print("-" * len(header))
    for num_samples in iwae_ks:
        estimate, seconds = timed(lambda: estimate_log_marginal(
            vae.model, vae.guide, x_test, num_samples=num_samples, seed=0), args.device)
        print(f"{'IWAE K=' + str(num_samples):<22} {num_samples:>12} {seconds:8.2f} "
              f"{estimate.mean:9.2f} {estimate.stderr:6.2f}", end="")
        if 25 <= num_samples <= 1000:  # k̂ needs M > 4 tail weights: K ≥ 25
            khat = pareto_khat(importance_log_weights(vae, x_test, num_samples))
            print(f" {khat.median().item():9.2f} {(khat > 0.7).float().mean().item():6.0%}")
        else:
            print(f" {'—':>9} {'—':>6}")
    for num_steps in ais_ts:
        estimate, seconds = timed(lambda: ais_log_marginal(
            vae.model, vae.guide, x_test, num_steps=num_steps, num_samples=chains,
            leapfrog_steps=leapfrog, seed=0), args.device)
        evals = chains * (1 + (num_steps - 1) * leapfrog)
        print(f"{'AIS T=' + str(num_steps):<22} {evals:>12} {seconds:8.2f} {estimate.mean:9.2f} "
              f"{estimate.stderr:6.2f}   (acceptance {estimate.acceptance.mean().item():.2f})")
    prior_steps = ais_ts[-1]
    estimate, seconds = timed(lambda: ais_log_marginal(
        vae.model, None, x_test, num_steps=prior_steps, num_samples=chains,
        leapfrog_steps=leapfrog, seed=0), args.device)
    evals = chains * (1 + (prior_steps - 1) * leapfrog)
    print(f"{'AIS T=' + str(prior_steps) + ' from p(z)':<22} {evals:>12} {seconds:8.2f} "
          f"{estimate.mean:9.2f} {estimate.stderr:6.2f}")
    khat = pareto_khat(importance_log_weights(vae, x_test, 1000, guide=False))
    print(f"(importance sampling from p(z), K=1000: k̂ > 0.7 for "
          f"{(khat > 0.7).float().mean().item():.0%} of images)")

    print(f"\nBDMC on {num_images} images simulated from the VAE (K = {chains} chains, L = "
          f"{leapfrog})")
    header = (f"{'T':>6} {'lower':>9} {'upper':>9} {'gap':>7} {'seconds':>8} "
              f"{'IWAE-' + str(sim_k):>11} {'IWAE - lower':>13}")
    print(header)
    print("-" * len(header))
    simulated_x = None
    for num_steps in ais_ts:
        result, seconds = timed(lambda: bdmc(
            vae.model, vae.guide, num_data=num_images, data_shape=(x.shape[1],),
            device=args.device, num_steps=num_steps, num_samples=chains,
            leapfrog_steps=leapfrog, seed=0), args.device)
        if simulated_x is None:
            simulated_x = result.x
            iwae = estimate_log_marginal(vae.model, vae.guide, simulated_x,
                                         num_samples=sim_k, seed=0)
        lower, upper = result.lower.mean().item(), result.upper.mean().item()
        print(f"{num_steps:>6} {lower:9.2f} {upper:9.2f} {result.gap.mean().item():7.2f} "
              f"{seconds:8.2f} {iwae.mean:11.2f} {iwae.mean - lower:13.2f}")
    print("\nevals/image: model(+guide) evaluations per image; AIS's are gradient evaluations "
          "(a forward and a backward pass), K·(1 + (T - 1)·L). seconds: wall clock, all images.\n"
          "k̂: PSIS Pareto shape of the IWAE weights per image (needs K ≥ 25; > 0.7: unreliable). "
          "IWAE - lower < 0: IWAE falls below BDMC's lower bound, so its error is at least that.")


if __name__ == "__main__":
    main()
