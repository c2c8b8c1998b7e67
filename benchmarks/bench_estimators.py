"""Claim: ``log_marginal`` on a trained MNIST VAE costs about what a hand-written vectorised PyTorch
IWAE of the same model costs (time ratio ≤ 1.1×, similar peak memory), and gives the same numbers.

Both run in this process on the same 500 held-out binarized images with K = 1, 10, 100, 1,000, 5,000,
with the same chunking (the hand-written code is given log_marginal's rows and particles per call).
Pyro's own ``Importance`` (one trace per particle, one log weight per *batch*) is timed too, per
image on a few images, where it applies (small K).
NumPyro's row (when numpyro and jax are installed; CPU): the same IWAE written in NumPyro and
compiled by ``jax.jit``, on the same weights with the same chunking; its steady-state time against
the hand-written code, and its compile time (the first call's extra time) apart.

    python benchmarks/bench_estimators.py            # trains a VAE for ~1 minute first
    python benchmarks/bench_estimators.py --quick    # 100 images, K ≤ 100
    python benchmarks/bench_estimators.py --run DIR  # a run written by `ppl-lvm train`

Last full run (2026-12-06; CPU, 1 thread, a 2-core machine with one other job; torch 2.13,
pyro 1.9.2, numpyro 0.22; s = CPU seconds; ratios to the hand-written IWAE, same chunking):

     K  log p(x)   ours s  hand s  ours   compiled  inductor (compile incl.)  NumPyro (jit s)
     1   -167.07    0.015   0.011  1.36×  2.26×     —                         1.11× (1.6)
    10   -164.04    0.066   0.058  1.14×  1.88×     —                         1.19× (3.1)
   100   -163.21    0.643   0.562  1.14×  1.12×     4.45×                     1.04× (1.5)
  1000   -162.89    7.195   5.364  1.34×  1.36×     1.30×                     1.25× (1.0)
  5000   -162.77   31.580  30.236  1.04×  1.08×     0.96×                     1.03× (1.5)

compiled: ``compile=True``, the fx graph, recorded once per process and checked against eager on
each call's first chunk of each shape (best of 3 calls for K ≤ 100, which reuse the first
call's graphs; one call, recording included, for K ≥ 1,000);
inductor: ``compile="inductor"``, one call with torch.compile's 2-3 s per chunk shape included.
Per chunk of 20 rows × 100 particles in steady state the fx graph runs 1.04× and the inductor one
0.91× the hand-written code; what a chunk costs beyond its graph (the eager first chunk, the
running sums, k̂) keeps the whole call above it except at K = 5,000. Pyro's ``Importance``,
image by image: 69-203× log_marginal's cost per image at K ≤ 100.
"""
import argparse
import math
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyro
import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, not installed
from ppl_lvm import VAE, binarize, fit, load_mnist, train_test_split  # noqa: E402
from ppl_lvm.estimators import estimate_log_marginal  # noqa: E402


class PeakMemory:
    """Peak memory above the start, in MiB: CUDA's allocator stats, or the RSS polled every 2 ms."""

    def __init__(self, device):
        self.device = torch.device(device)

    @staticmethod
    def _rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device)
            return self
        self.start = self.peak = self._rss()
        self.running = True

        def poll():
            while self.running:
                self.peak = max(self.peak, self._rss())
                time.sleep(0.002)
        self.thread = threading.Thread(target=poll, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.running = False
            self.thread.join()
            self.peak = max(self.peak, self._rss())
        self.mib = (self.peak - self.start) / 2**20


@torch.no_grad()
def iwae_by_hand(vae, x, num_samples, rows_per_call, particles_per_call):
    """log (1/K) Σ_k p(x, z_k) / q(z_k | x) for the Bernoulli VAE, written directly in PyTorch: [N]."""
    out = []
    for x_rows in x.split(rows_per_call):
        loc, scale = vae.encoder(x_rows)  # [n, Z]
        log_sum, count = None, 0
        while count < num_samples:
            k = min(particles_per_call, num_samples - count)
            eps = torch.randn((k,) + loc.shape, device=x.device)
            z = loc + scale * eps  # [k, n, Z]
            log_q = (-0.5 * eps**2 - scale.log() - 0.5 * math.log(2 * math.pi)).sum(-1)
            log_prior = (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).sum(-1)
            logits = vae.decoder.net(z)  # [k, n, D]
            log_lik = -F.binary_cross_entropy_with_logits(
                logits, x_rows.expand_as(logits), reduction="none").sum(-1)
            part = torch.logsumexp(log_prior + log_lik - log_q, 0)
            log_sum = part if log_sum is None else torch.logaddexp(log_sum, part)
            count += k
        out.append(log_sum - math.log(num_samples))
    return torch.cat(out)


def numpyro_iwae(vae):
    """The same IWAE in NumPyro, jit-compiled: ``estimate(x, K, rows_per_call, particles_per_call,
    seed) -> [N]`` over the same VAE's weights (copied), or None when numpyro is not installed.

    The model and guide are NumPyro programs of the same math; one call traces the guide under a
    plate of k particles (dim -2) left of the data plate, replays the model on its z and reads each
    site's log-prob [k, n] from the traces (as ``numpyro.infer.util.log_likelihood`` does), so the
    encoder runs once per chunk as in the hand-written code. ``jax.jit`` compiles one program per
    (rows, particles) shape on its first call."""
    try:
        import jax
        import jax.numpy as jnp
        import numpyro
        import numpyro.distributions as ndist
        from numpyro.handlers import seed, substitute, trace
    except ImportError:
        return None

    def weights(module):
        return [(jnp.asarray(layer.weight.detach().cpu().numpy().T),
                 jnp.asarray(layer.bias.detach().cpu().numpy()))
                for layer in module.net if isinstance(layer, torch.nn.Linear)]

    params = {"encoder": weights(vae.encoder), "decoder": weights(vae.decoder)}

    def mlp(layers, h):
        for i, (weight, bias) in enumerate(layers):
            h = h @ weight + bias
            if i + 1 < len(layers):
                h = jax.nn.softplus(h)
        return h

    def model(params, x, k):
        with numpyro.plate("particles", k, dim=-2), numpyro.plate("data", x.shape[0], dim=-1):
            z = numpyro.sample("z", ndist.Normal(jnp.zeros((x.shape[0], vae.z_dim)), 1.0)
                               .to_event(1))
            numpyro.sample("x", ndist.Bernoulli(logits=mlp(params["decoder"], z)).to_event(1),
                           obs=x)

    def guide(params, x, k):
        loc, raw = jnp.split(mlp(params["encoder"], x), 2, axis=-1)
        with numpyro.plate("particles", k, dim=-2), numpyro.plate("data", x.shape[0], dim=-1):
            numpyro.sample("z", ndist.Normal(loc, jax.nn.softplus(raw) + 1e-4).to_event(1))

    def chunk(params, key, x, k):
        """log Σ_k p(x, z_k) / q(z_k | x) over k particles: [n]."""
        guide_trace = trace(seed(guide, key)).get_trace(params, x, k)
        z = guide_trace["z"]["value"]
        model_trace = trace(substitute(model, {"z": z})).get_trace(params, x, k)
        log_w = sum(site["fn"].log_prob(site["value"]) for site in model_trace.values()
                    if site["type"] == "sample")
        log_w = log_w - guide_trace["z"]["fn"].log_prob(z)  # [k, n]
        return jax.nn.logsumexp(log_w, 0)

    compiled_chunk = jax.jit(chunk, static_argnums=3)

    def estimate(x, num_samples, rows_per_call, particles_per_call, seed_=0):
        images = jnp.asarray(x.cpu().numpy())
        key = jax.random.PRNGKey(seed_)
        out = []
        for start in range(0, images.shape[0], rows_per_call):
            rows = images[start:start + rows_per_call]
            log_sum, count = None, 0
            while count < num_samples:
                k = min(particles_per_call, num_samples - count)
                key, draw = jax.random.split(key)
                part = compiled_chunk(params, draw, rows, k)
                log_sum = part if log_sum is None else jnp.logaddexp(log_sum, part)
                count += k
            out.append(log_sum - math.log(num_samples))
        return torch.from_numpy(np.array(jnp.concatenate(out).block_until_ready()))

    return estimate


def importance_per_image(vae, x, num_samples):
    """Pyro's Importance, one image at a time (its log weights pool a whole batch): [n]."""
    out = []
    for row in x:
        posterior = pyro.infer.Importance(vae.model, vae.guide, num_samples=num_samples)
        posterior.run(row[None])
        out.append(posterior.get_log_normalizer())
    return torch.stack(out)


def timed(fn, device, repeats):
    """(result, seconds, peak MiB): CPU seconds of this process on CPU (robust to a machine shared
    with other jobs; both contenders use the same threads), wall seconds on CUDA; best of repeats."""
    cuda = torch.device(device).type == "cuda"
    clock = time.perf_counter if cuda else time.process_time
    best, result, memory = math.inf, None, None
    for _ in range(repeats):
        with PeakMemory(device) as peak:
            start = clock()
            result = fn()
            if cuda:
                torch.cuda.synchronize(device)
            elapsed = clock() - start
        best = min(best, elapsed)
        memory = peak.mib if memory is None else max(memory, peak.mib)
    return result, best, memory


def trained_vae(args):
    if args.run:
        from ppl_lvm.runs import load_run, run_data
        vae, config = load_run(args.run, device=args.device)
        _, x_test = run_data(config["data"], device=args.device)
        return vae, x_test
    x, _ = load_mnist(device=args.device)
    x_train, x_test = train_test_split(x, test_fraction=0.1, seed=0)
    x_test = binarize(x_test, method="stochastic", seed=0)
    vae = VAE(x.shape[1], z_dim=20, hidden_dim=400)
    start = time.perf_counter()
    fit(vae.model, vae.guide, x_train, epochs=args.epochs, batch_size=100, lr=1e-3,
        device=args.device, seed=0, progress=False,
        transform=lambda batch: binarize(batch, method="stochastic"))
    print(f"trained VAE(784, z=20, hidden=400) for {args.epochs} epochs on {len(x_train)} "
          f"images in {time.perf_counter() - start:.0f} s")
    return vae, x_test


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100 images, K up to 100")
    parser.add_argument("--run", help="a trained run folder (skips training)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--num-images", type=int, default=None)
    args = parser.parse_args()
    if args.quick:
        args.epochs = min(args.epochs, 1)
    torch.set_grad_enabled(True)
    if torch.get_num_threads() == 1:  # NumPyro's XLA on one thread too, as torch here
        os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false "
                                           "intra_op_parallelism_threads=1")
    vae, x_test = trained_vae(args)
    numpyro_estimate = numpyro_iwae(vae) if torch.device(args.device).type == "cpu" else None
    vae.eval()
    num_images = args.num_images or (100 if args.quick else 500)
    x = x_test[:num_images].to(args.device)
    ks = [1, 10, 100] if args.quick else [1, 10, 100, 1000, 5000]
    print(f"{num_images} held-out images on {args.device}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, pyro {pyro.__version__}\n")
    header = (f"{'K':>6} {'log p(x)':>9} {'|Δ| hand':>8} {'ours s':>8} {'hand s':>8} {'ratio':>6} "
              f"{'ours MiB':>9} {'hand MiB':>9} {'mem ratio':>9} {'compiled s':>10} "
              f"{'ratio':>6} {'inductor s':>10} {'ratio':>6} {'numpyro s':>9} {'ratio':>6} {'jit s':>6} {'numpyro':>8} "
              f"{'Importance s/im':>16} {'vs ours/img':>11}")
    print(header)
    print("-" * len(header))
    for num_samples in ks:
        repeats = 3 if num_samples <= 100 else 1
        torch.manual_seed(0)
        ours, ours_s, ours_mib = timed(lambda: estimate_log_marginal(
            vae.model, vae.guide, x, num_samples=num_samples), args.device, repeats)
        torch.manual_seed(0)
        _, graph_s, _ = timed(lambda: estimate_log_marginal(
            vae.model, vae.guide, x, num_samples=num_samples, compile=True), args.device, repeats)
        inductor_row = f"{'—':>10} {'—':>6}"
        if num_samples >= 100:  # compiling takes seconds per chunk shape: for long runs only
            torch.manual_seed(0)
            _, inductor_s, _ = timed(lambda: estimate_log_marginal(
                vae.model, vae.guide, x, num_samples=num_samples, compile="inductor"),
                args.device, 1)
        torch.manual_seed(0)
        hand, hand_s, hand_mib = timed(lambda: iwae_by_hand(
            vae, x, num_samples, ours.rows_per_call, ours.particles_per_call), args.device, repeats)
        numpyro_row = f"{'—':>9} {'—':>6} {'—':>6} {'—':>8}"
        if numpyro_estimate is not None:
            # the first call compiles one program per chunk shape; then best of repeats
            chunking = (num_samples, ours.rows_per_call, ours.particles_per_call)
            _, first_s, _ = timed(lambda: numpyro_estimate(x, *chunking), args.device, 1)
            numpyro_px, numpyro_s, _ = timed(lambda: numpyro_estimate(x, *chunking), args.device,
                                             repeats)
            numpyro_row = (f"{numpyro_s:9.3f} {numpyro_s / hand_s:5.2f}× "
                           f"{max(first_s - numpyro_s, 0.0):6.2f} {numpyro_px.mean():8.2f}")
        if num_samples <= 100:
            few = x[:5]
            _, imp_s, _ = timed(lambda: importance_per_image(vae, few, num_samples), args.device, 1)
            imp_per_image = imp_s / len(few)
            importance = f"{imp_per_image:16.4f} {imp_per_image / (ours_s / num_images):10.0f}×"
        else:
            importance = f"{'(too slow)':>16} {'':>11}"
        if num_samples >= 100:
            inductor_row = f"{inductor_s:10.3f} {inductor_s / hand_s:5.2f}×"
        gap = (ours.log_px - hand).abs().mean().item()
        memory_ratio = f"{ours_mib / hand_mib:8.2f}×" if hand_mib >= 1 else f"{'—':>9}"
        print(f"{num_samples:>6} {ours.mean:9.2f} {gap:8.3f} {ours_s:8.3f} {hand_s:8.3f} "
              f"{ours_s / hand_s:5.2f}× {ours_mib:9.1f} {hand_mib:9.1f} {memory_ratio} "
              f"{graph_s:10.3f} {graph_s / hand_s:5.2f}× {inductor_row} {numpyro_row} "
              f"{importance}", flush=True)
    print("\ns: CPU seconds on CPU (wall on CUDA); ratio: log_marginal's time / the hand-written "
          "IWAE's (best of 3 for K ≤ 100); "
          "|Δ| hand: mean |difference| per image (Monte Carlo noise: different draws);\n"
          "MiB: peak memory above the start (RSS polled on CPU, allocator peak on CUDA; — below 1 MiB); "
          "Importance: pyro.infer.Importance run image by image on 5 images;\n"
          "compiled: log_marginal(compile=True), each chunk shape recorded once per process "
          "and checked on each call's first chunk; inductor: log_marginal(compile=\"inductor\"), one call, "
          "torch.compile's time included (K ≥ 100);\n"
          "numpyro: the same IWAE in NumPyro under jax.jit, same weights and chunking, steady "
          "state (ratio to hand); jit s: its first call's extra time (compiling each chunk "
          "shape); numpyro: its mean log p(x).")


if __name__ == "__main__":
    main()
