"""Claim: ``ais_log_marginal(compile=True)`` (the annealed log-density and its gradient recorded
once as a graph, ``ppl_lvm.compiled.CompiledDensity``) gives eager AIS's numbers in less time,
since eager AIS re-traces the Pyro model and guide at every leapfrog gradient.

A small VAE (64-200-10, Bernoulli) trained briefly on binarized sklearn digits; AIS from q(z | x)
on held-out images, eager and compiled with the same seed, in interleaved rounds in this process
(the machine may be shared: only ratios within one run mean anything; times are this process's
CPU seconds, robust to other jobs on a shared machine). Compiled time includes recording and
checking the graphs (once per chunk shape, per call).

    python benchmarks/bench_ais_compile.py            # 200 images, K = 8, T = 100, L = 5
    python benchmarks/bench_ais_compile.py --quick    # 50 images, T = 20

Last run (CPU, one thread, a 2-core machine shared with other jobs; torch 2.13, pyro 1.9.2):

    VAE(64, z=10, hidden=200), 200 held-out digits, K=8 chains, T=100, L=5
    path       median s             CPU s per round   log p(x)
    eager          4.54              4.54 4.79 4.46    -23.668
    compiled       3.26              3.81 3.26 2.84    -23.668
    compiled / eager: 0.68x (median of 3 interleaved rounds: 0.84 0.68 0.64); max |Δ log p(x)| = 0
    compiled density: 2 graph(s) in 0.5 s; 494 evaluations on the graph, 2 eager
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import pyro
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, not installed
from ppl_lvm import VAE, binarize, fit, load_digits  # noqa: E402
from ppl_lvm.ais import ais_log_marginal  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    num_images, num_temperatures = (50, 20) if args.quick else (200, 100)
    num_samples, leapfrog_steps = 8, 5

    x, _ = load_digits()
    x = binarize(x, "threshold")
    pyro.set_rng_seed(0)
    pyro.clear_param_store()
    vae = VAE(64, z_dim=10, hidden_dim=200)
    fit(vae.model, vae.guide, x[:1400], epochs=5, batch_size=100, progress=False)
    vae.eval()
    held_out = x[-num_images:]
    print(f"VAE(64, z=10, hidden=200), {num_images} held-out digits, K={num_samples} chains, "
          f"T={num_temperatures}, L={leapfrog_steps}; torch {torch.__version__}, pyro {pyro.__version__}, "
          f"{torch.get_num_threads()} thread(s)")

    def run(compile):
        start = time.process_time()
        estimate = ais_log_marginal(vae.model, vae.guide, held_out,
                                    num_temperatures=num_temperatures,
                                    num_samples=num_samples, leapfrog_steps=leapfrog_steps,
                                    seed=0, compile=compile)
        return time.process_time() - start, estimate

    run(True)  # make_fx's first use in a process (~3 s of imports) is not the graph's cost
    times = {False: [], True: []}
    for _ in range(args.rounds):
        for compile in (False, True):
            seconds, estimate = run(compile)
            times[compile].append(seconds)
            if compile:
                compiled_estimate = estimate
            else:
                eager_estimate = estimate
    difference = (compiled_estimate.log_px - eager_estimate.log_px).abs().max().item()
    ratios = [graph / eager for eager, graph in zip(times[False], times[True])]
    print(f"{'path':<10}{'median s':>9}{'CPU s per round':>28}{'log p(x)':>11}")
    for name, compile, estimate in (("eager", False, eager_estimate),
                                    ("compiled", True, compiled_estimate)):
        rounds = " ".join(f"{t:.2f}" for t in times[compile])
        print(f"{name:<10}{statistics.median(times[compile]):>9.2f}{rounds:>28}"
              f"{estimate.mean:>11.3f}")
    print(f"compiled / eager: {statistics.median(ratios):.2f}x (median of {args.rounds} "
          f"interleaved rounds: {' '.join(f'{r:.2f}' for r in ratios)}); "
          f"max |Δ log p(x)| = {difference:.2e}\n{compiled_estimate.compiled}")


if __name__ == "__main__":
    main()
