"""Benchmark: the cost of one SVI step (batch 128) for amortized, local and semi-amortized guides.

Claims checked (the script exits 1 when one fails) (``--inductor`` adds fit(compile="inductor")'s
step; the compiled rows are fit(compile=True)'s steady-state step, ``ppl_lvm.compiled``):
  1. an amortized step through ppl_lvm as ``fit`` takes it after its first epoch (Pyro model/guide,
     svi_step and LazyAdam; ``fit(validate="first_epoch")`` runs Pyro's argument/support checks
     while every row is seen once, then steps without them) costs at most 1.15x
     a hand-written PyTorch step of the same VAE and the same loss (one-sample -ELBO, scaled N / B);
  2. a local (per-datapoint φ_i) step does not grow with N: N = 600,000 costs at most 1.2x N = 5,000
     (sparse rows + lazy Adam, never a dense pass over the table).
The same step with Pyro's validation on (fit's first epoch) is shown for reference (Pyro checks
every distribution's arguments and every observed value's support when validation is on).
Timings are medians of interleaved repeats (each method timed in turn, round after round) so that
load from other processes hits all of them alike.

    python benchmarks/bench_svi_step.py            # full: 784-400-20 VAE, 200 steps per method
    python benchmarks/bench_svi_step.py --quick    # a smoke run
"""
import argparse
import math
import statistics
import sys
import time

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import Trace_ELBO
from torch.nn import functional as F

from ppl_lvm.compiled import CompiledELBO
from ppl_lvm.guides import LocalGuide, SemiAmortizedGuide
from ppl_lvm.models.vae import VAE
from ppl_lvm.train import adam, bind_rows, svi_step

LOCAL_SIZES = (5_000, 60_000, 600_000)


class HandWritten:
    """The same VAE step written in plain PyTorch: z = μ + σ ε, loss = -(N/B) Σ_i [log p(x_i|z_i)
    + log p(z_i) - log q(z_i|x_i)], Adam on encoder and decoder."""

    def __init__(self, vae, lr):
        self.vae = vae
        self.optim = torch.optim.Adam(vae.parameters(), lr=lr)

    def step(self, x, num_data):
        loc, scale = self.vae.encoder(x)
        z = loc + scale * torch.randn_like(loc)
        logits = self.vae.decoder.net(z)
        log_px = -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)
        log_pz = dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
        log_qz = dist.Normal(loc, scale).log_prob(z).sum(-1)
        loss = -(num_data / x.shape[0]) * (log_px + log_pz - log_qz).sum()
        self.optim.zero_grad()
        loss.backward()
        self.optim.step()
        return loss.item()


class HandWrittenLocal:
    """A local step in plain PyTorch: a sparse nn.Embedding table of (μ_i, log σ_i) + SparseAdam."""

    def __init__(self, vae, num_data, lr, device="cpu"):
        self.vae, self.num_data = vae, num_data
        self.table = torch.nn.Embedding(num_data, 2 * vae.z_dim, sparse=True, device=device)
        torch.nn.init.zeros_(self.table.weight)
        self.optim_table = torch.optim.SparseAdam(self.table.parameters(), lr=1e-2)
        self.optim = torch.optim.Adam(vae.decoder.parameters(), lr=lr)

    def step(self, x, idx):
        loc, log_scale = self.table(idx).chunk(2, dim=-1)
        scale = log_scale.exp()
        z = loc + scale * torch.randn_like(loc)
        logits = self.vae.decoder.net(z)
        log_px = -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)
        log_pz = dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
        log_qz = dist.Normal(loc, scale).log_prob(z).sum(-1)
        loss = -(self.num_data / x.shape[0]) * (log_px + log_pz - log_qz).sum()
        self.optim.zero_grad()
        self.optim_table.zero_grad()
        loss.backward()
        self.optim.step()
        self.optim_table.step()
        return loss.item()


class HandWrittenSemiAmortized(HandWritten):
    """Kim et al. (2018) in plain PyTorch: the encoder's (μ, log σ) refined by S gradient steps on
    the one-sample ELBO of the batch (θ fixed, cosine-decayed natural-gradient steps as in
    ``ppl_lvm.guides.refine``), then one Adam step on encoder and decoder from the refined q."""

    def __init__(self, vae, lr, steps, refine_lr=0.2):
        super().__init__(vae, lr)
        self.steps, self.refine_lr = steps, refine_lr

    def elbo(self, x, loc, log_scale):
        z = loc + log_scale.exp() * torch.randn_like(loc)
        logits = self.vae.decoder.net(z)
        log_px = -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)
        log_pz = dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
        log_qz = dist.Normal(loc, log_scale.exp()).log_prob(z).sum(-1)
        return log_px + log_pz - log_qz

    def step(self, x, num_data):
        loc, scale = self.vae.encoder(x)
        start_loc, start_log_scale = loc, scale.log()
        params = [start_loc.detach().requires_grad_(), start_log_scale.detach().requires_grad_()]
        for t in range(self.steps):
            grads = torch.autograd.grad(self.elbo(x, *params).sum(), params)
            size = self.refine_lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t / self.steps)))
            variance = (2 * params[1]).exp().detach()
            params = [(params[0] + (size * variance * grads[0]).clamp(-2 * variance.sqrt(),
                                                                      2 * variance.sqrt()))
                      .detach().requires_grad_(),
                      (params[1] + (size * grads[1] / 2).clamp(-1.0, 1.0)).detach().requires_grad_()]
        # first order: the refinement's result carries gradients to the encoder's output
        loc = start_loc + (params[0] - start_loc).detach()
        log_scale = start_log_scale + (params[1] - start_log_scale).detach()
        loss = -(num_data / x.shape[0]) * self.elbo(x, loc, log_scale).sum()
        self.optim.zero_grad()
        loss.backward()
        self.optim.step()
        return loss.item()


def make_pyro_step(model, guide, num_data, pool, batch_size, optim, loss=None):
    """One method's step, in its own param store: every VAE here names its modules "encoder" and
    "decoder", and in a shared store a second VAE's modules keep their own tensors while the
    store (whose tensors Adam steps, and a compiled graph takes as inputs) holds the first's."""
    loss = loss or Trace_ELBO()
    gen = torch.Generator().manual_seed(1)
    state = {"params": {}, "constraints": {}}

    def step():
        idx = torch.randint(num_data, (batch_size,), generator=gen)
        x = pool[idx % len(pool)]
        with pyro.get_param_store().scope(state):
            return svi_step(bind_rows(model, idx, num_data), bind_rows(guide, idx, num_data),
                            optim, loss, (x,))
    return step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few steps, small pool (a smoke run)")
    parser.add_argument("--steps", type=int, default=200, help="timed steps per method")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--semi-steps", type=int, default=5, help="refinement steps S")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-check", action="store_true", help="print only; exit 0")
    parser.add_argument("--inductor", action="store_true",
                        help="also time fit(compile='inductor')'s step (torch.compile: ~10-60 s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps = 20 if args.quick else args.steps
    device = torch.device(args.device)
    data_dim, z_dim, hidden, batch = 784, 20, 400, args.batch_size
    gen = torch.Generator().manual_seed(0)
    pool = (torch.rand(4096, data_dim, generator=gen) < 0.3).float().to(device)
    pyro.clear_param_store()

    methods = {}
    torch.manual_seed(0)
    hand_vae = VAE(data_dim, z_dim, hidden).to(device)
    hand = HandWritten(hand_vae, 1e-3)
    hand_gen = torch.Generator().manual_seed(1)

    def hand_step(num_data=60_000):
        idx = torch.randint(num_data, (batch,), generator=hand_gen)
        return hand.step(pool[idx % len(pool)], num_data)
    methods["hand-written PyTorch (amortized)"] = hand_step

    torch.manual_seed(0)
    vae = VAE(data_dim, z_dim, hidden).to(device)
    methods["amortized, validation on (ppl_lvm, epoch 1)"] = make_pyro_step(
        vae.model, vae.guide, 60_000, pool, batch, adam())
    torch.manual_seed(0)
    quiet_vae = VAE(data_dim, z_dim, hidden).to(device)
    quiet_step = make_pyro_step(quiet_vae.model, quiet_vae.guide, 60_000, pool, batch, adam())

    def unvalidated_step():
        pyro.enable_validation(False)
        try:
            return quiet_step()
        finally:
            pyro.enable_validation(True)
    methods["amortized (ppl_lvm)"] = unvalidated_step

    backends = ("fx", "inductor") if args.inductor else ("fx",)
    for backend in backends:  # fit(compile=...)'s step: the recorded graph, validation off
        torch.manual_seed(0)
        graph_vae = VAE(data_dim, z_dim, hidden).to(device)
        graph_step = make_pyro_step(graph_vae.model, graph_vae.guide, 60_000, pool, batch, adam(),
                                    CompiledELBO(Trace_ELBO(), backend=backend))

        def compiled_step(graph_step=graph_step):
            pyro.enable_validation(False)
            try:
                return graph_step()
            finally:
                pyro.enable_validation(True)
        methods[f"amortized, compiled {backend} (ppl_lvm)"] = compiled_step

    for num_data in LOCAL_SIZES:
        torch.manual_seed(0)
        local_vae = VAE(data_dim, z_dim, hidden).to(device)
        guide = LocalGuide(num_data, {"z": z_dim}, name=f"bench{num_data}")  # table: at warm-up
        methods[f"local N={num_data:,} (ppl_lvm)"] = make_pyro_step(
            local_vae.model, guide, num_data, pool, batch, adam())

    torch.manual_seed(0)
    hand_local_vae = VAE(data_dim, z_dim, hidden).to(device)
    hand_local = HandWrittenLocal(hand_local_vae, LOCAL_SIZES[-1], 1e-3, device)
    hand_local_gen = torch.Generator().manual_seed(1)

    def hand_local_step():
        idx = torch.randint(LOCAL_SIZES[-1], (batch,), generator=hand_local_gen).to(device)
        return hand_local.step(pool[idx % len(pool)], idx)
    methods[f"hand-written PyTorch local N={LOCAL_SIZES[-1]:,}"] = hand_local_step

    torch.manual_seed(0)
    semi_vae = VAE(data_dim, z_dim, hidden).to(device)
    semi = SemiAmortizedGuide(semi_vae.model, semi_vae.encoder, steps=args.semi_steps,
                              num_particles=1)
    methods[f"semi-amortized S={args.semi_steps}, 1 particle (ppl_lvm)"] = make_pyro_step(
        semi_vae.model, semi, 60_000, pool, batch, adam())
    torch.manual_seed(0)
    hand_semi = HandWrittenSemiAmortized(VAE(data_dim, z_dim, hidden).to(device), 1e-3,
                                         args.semi_steps)
    hand_semi_gen = torch.Generator().manual_seed(1)

    def hand_semi_step(num_data=60_000):
        idx = torch.randint(num_data, (batch,), generator=hand_semi_gen)
        return hand_semi.step(pool[idx % len(pool)], num_data)
    methods[f"hand-written semi-amortized S={args.semi_steps}"] = hand_semi_step

    for step in methods.values():  # warm up: optimiser states, first-call costs
        for _ in range(3):
            step()
    times = {name: [] for name in methods}
    for _ in range(steps):
        for name, step in methods.items():
            start = time.perf_counter()
            value = step()
            times[name].append(time.perf_counter() - start)
            if not math.isfinite(value):
                raise RuntimeError(f"{name}: loss became {value}")

    median = {name: statistics.median(t) * 1e3 for name, t in times.items()}
    base = median["hand-written PyTorch (amortized)"]
    local_small = median[f"local N={LOCAL_SIZES[0]:,} (ppl_lvm)"]
    print(f"one SVI step, batch {batch}, VAE {data_dim}-{hidden}-{z_dim} (Bernoulli), "
          f"{args.threads} thread(s), {device}, median of {steps} interleaved steps")
    print(f"{'method':<52} {'ms/step':>9} {'vs hand-written':>16} {'vs local N=5,000':>17}")
    for name, ms in median.items():
        vs_local = f"{ms / local_small:.2f}x" if name.startswith("local") or "local N" in name else ""
        print(f"{name:<52} {ms:9.2f} {ms / base:15.2f}x {vs_local:>17}")

    checks = [
        ("amortized <= 1.15x hand-written", median["amortized (ppl_lvm)"] / base, 1.15),
        ("compiled (fx) step <= the eager one", median["amortized, compiled fx (ppl_lvm)"]
         / median["amortized (ppl_lvm)"], 1.0),
        (f"semi-amortized S={args.semi_steps} <= 1.15x its hand-written refinement",
         median[f"semi-amortized S={args.semi_steps}, 1 particle (ppl_lvm)"]
         / median[f"hand-written semi-amortized S={args.semi_steps}"], 1.15),
        (f"local N={LOCAL_SIZES[-1]:,} <= 1.2x local N={LOCAL_SIZES[0]:,}",
         median[f"local N={LOCAL_SIZES[-1]:,} (ppl_lvm)"] / local_small, 1.2),
    ]
    failed = False
    for label, ratio, limit in checks:
        ok = ratio <= limit
        failed |= not ok
        print(f"{'PASS' if ok else 'FAIL'}: {label} (ratio {ratio:.3f})")
    return 1 if failed and not args.no_check and not args.quick else 0


if __name__ == "__main__":
    sys.exit(main())
