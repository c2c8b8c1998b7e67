"""Claim: a diagonal mixture of Gaussians fitted by SVI with z enumerated is as good as EM.

On sklearn digits (PCA to 10 dims) and the bundled MNIST (5,000 digits, PCA to 30 dims), K = 10,
each seed gives one k-means++ start shared by scikit-learn's GaussianMixture (EM) and the three
SVI fits (enumeration, REINFORCE with a per-datapoint guide, amortized encoder). Printed per
method: held-out log-likelihood per point (mean ± sd over seeds), its gap to EM's in percent
(positive = worse), the training log-likelihood, fit time as a ratio to EM's, epochs (EM: iterations),
and the adjusted Rand index of the held-out clustering against the digit labels. EM runs twice:
with scikit-learn's default tol=1e-3 (the baseline of the ratios) and to tol=1e-7 ("em_converged",
the maximum-likelihood fit that gradient ascent on log p(x) converges to).

    python benchmarks/bench_mog.py            # 5 seeds, both data sets, all methods
    python benchmarks/bench_mog.py --quick    # 1 seed, digits only
"""
import argparse
import statistics
import time
import warnings

import numpy as np
import torch
from sklearn.decomposition import PCA
from sklearn.metrics import adjusted_rand_score
from sklearn.mixture import GaussianMixture

from ppl_lvm.data import load_digits, load_mnist, train_test_split
from ppl_lvm.models.mog import fit_mixture, kmeans_init

DATASETS = {"digits": (load_digits, 10), "mnist": (load_mnist, 30)}


def prepare(name):
    """Train/test split (seed 0, 20 % test) projected on the train split's principal components."""
    loader, dim = DATASETS[name]
    x, y = loader()
    (x_train, y_train), (x_test, y_test) = train_test_split(x, y, test_fraction=0.2, seed=0)
    pca = PCA(dim, random_state=0).fit(x_train.numpy())
    as_tensor = lambda a: torch.tensor(pca.transform(a.numpy()), dtype=torch.float32)
    return as_tensor(x_train), y_train.numpy(), as_tensor(x_test), y_test.numpy()


def fit_em(x_train, init, tol):
    weights = init["weights"].double().numpy()
    gm = GaussianMixture(len(weights), covariance_type="diag", weights_init=weights / weights.sum(),
                         means_init=init["means"].double().numpy(),
                         precisions_init=1 / init["covariances"].double().numpy(),
                         tol=tol, max_iter=1000, reg_covar=1e-6)
    start = time.perf_counter()
    gm.fit(x_train.double().numpy())
    return gm, time.perf_counter() - start


def run(name, seeds, methods, num_components, em_tol, rtol, max_epochs):
    x_train, y_train, x_test, y_test = prepare(name)
    rows = {m: [] for m in ("em", "em_converged", *methods)}
    train64, test64 = x_train.double().numpy(), x_test.double().numpy()
    for seed in seeds:
        init = kmeans_init(x_train, num_components, seed=seed, covariance="diag")
        gm, em_time = fit_em(x_train, init, em_tol)
        em_ll = gm.score(test64)
        rows["em"].append({"ll": em_ll, "train_ll": gm.score(train64), "time": em_time, "ratio": 1.0,
                           "epochs": gm.n_iter_, "gap": 0.0, "ari": adjusted_rand_score(y_test, gm.predict(test64))})
        # EM run to a tight tolerance: the maximum-likelihood fit SVI climbs to
        tight, tight_time = fit_em(x_train, init, 1e-7)
        rows["em_converged"].append({
            "ll": tight.score(test64), "train_ll": tight.score(train64), "time": tight_time,
            "ratio": tight_time / em_time, "epochs": tight.n_iter_,
            "gap": 100 * (em_ll - tight.score(test64)) / abs(em_ll),
            "ari": adjusted_rand_score(y_test, tight.predict(test64))})
        for method in methods:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = fit_mixture(x_train, num_components, method, "diag", init_params=init,
                                     seed=seed, rtol=rtol, max_epochs=max_epochs)
            mixture = result.mixture
            with torch.no_grad():
                ll = mixture.log_prob(x_test).mean().item()
                ari = adjusted_rand_score(y_test, mixture.cluster(x_test).numpy())
                train_ll = mixture.log_prob(x_train).mean().item()
            rows[method].append({"ll": ll, "train_ll": train_ll, "time": result.wall_time, "ratio": result.wall_time / em_time,
                                 "epochs": result.epochs, "ari": ari, "gap": 100 * (em_ll - ll) / abs(em_ll)})
            print(f"  {name} seed {seed} {method:9s} LL {ll:9.4f} (EM {em_ll:9.4f}) train LL {train_ll:9.4f} "
                  f"(EM {gm.score(train64):9.4f}, converged EM {tight.score(train64):9.4f}) "
                  f"time {result.wall_time:6.2f}s (EM {em_time:.3f}s) epochs {result.epochs} ARI {ari:.3f}",
                  flush=True)
    return rows


def summary(values):
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def print_table(name, rows):
    print(f"\n{name}: held-out log-likelihood per point (nats), {len(rows['em'])} seed(s)")
    print("| method | held-out LL | gap to EM (%) | train LL | fit time (s) | time ratio vs EM | epochs | ARI |")
    print("|---|---|---|---|---|---|---|---|")
    for method, runs in rows.items():
        gaps = [r["gap"] for r in runs]
        print(f"| {method} | {summary([r['ll'] for r in runs])} | "
              f"{statistics.mean(gaps):+.3f} (worst {max(gaps):+.3f}) | "
              f"{summary([r['train_ll'] for r in runs])} | "
              f"{statistics.mean(r['time'] for r in runs):.3f} | "
              f"{statistics.mean(r['ratio'] for r in runs):.1f}x | "
              f"{statistics.mean(r['epochs'] for r in runs):.0f} | "
              f"{summary([r['ari'] for r in runs])} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, digits only")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--datasets", default="digits,mnist")
    parser.add_argument("--methods", default="enum,reinforce,amortized")
    parser.add_argument("--num-components", type=int, default=10)
    parser.add_argument("--em-tol", type=float, default=1e-3, help="scikit-learn's tol (its default)")
    parser.add_argument("--rtol", type=float, default=1e-6)
    parser.add_argument("--max-epochs", type=int, default=3000)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (EM uses numpy's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    datasets = ["digits"] if args.quick else args.datasets.split(",")
    seeds = range(1 if args.quick else args.seeds)
    methods = args.methods.split(",")
    print(f"K={args.num_components}, diagonal covariances, EM tol={args.em_tol}, SVI rtol={args.rtol}, "
          f"max_epochs={args.max_epochs}, torch threads={args.threads}")
    tables = {name: run(name, seeds, methods, args.num_components, args.em_tol, args.rtol,
                        args.max_epochs) for name in datasets}
    for name, rows in tables.items():
        print_table(name, rows)


if __name__ == "__main__":
    main()
