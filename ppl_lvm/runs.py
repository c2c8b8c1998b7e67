"""A trained run on disk: its config, weights, data split and metrics, so later commands
(`evaluate`, `gaps`, `complete`) rebuild exactly what `train` fitted."""
import json
from pathlib import Path

import torch

from ppl_lvm import data as datasets
from ppl_lvm.models.vae import VAE

MODELS = {"vae": VAE}
CONFIG_NAME, WEIGHTS_NAME, METRICS_NAME = "config.json", "model.pt", "metrics.json"


def run_data(data_config, device="cpu"):
    """The run's (x_train, x_test) [N, D], rebuilt from its data config (same split, same binarization).

    Bernoulli runs keep x_train in [0, 1] (binarized afresh per minibatch by ``fit``'s transform)
    and binarize x_test once, stochastically, with a fixed seed.
    """
    x, _ = datasets.load_dataset(data_config["name"], path=data_config.get("path"), device=device)
    x_train, x_test = datasets.train_test_split(
        x, test_fraction=data_config["test_fraction"], seed=data_config["split_seed"])
    if data_config.get("binarize"):
        x_test = datasets.binarize(x_test, method="stochastic", seed=data_config["split_seed"])
    return x_train, x_test


def save_run(out_dir, model_name, module, config, metrics=None):
    """Write config.json, model.pt (weights + constructor config) and metrics.json into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {**config, "model": model_name, "model_config": module.config()}
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    torch.save({"config": module.config(), "state_dict": module.state_dict()}, out_dir / WEIGHTS_NAME)
    if metrics is not None:
        (out_dir / METRICS_NAME).write_text(json.dumps(metrics, indent=2))


def load_run(run_dir, device="cpu"):
    """Rebuild a trained run: returns (module, config). Clear errors for a missing or bad folder."""
    run_dir = Path(run_dir)
    config_path, weights_path = run_dir / CONFIG_NAME, run_dir / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: is {run_dir} a folder written by "
                                    "`ppl-lvm train`?")
    config = json.loads(config_path.read_text())
    if config.get("model") not in MODELS:
        raise ValueError(f"{config_path} names unknown model {config.get('model')!r}; "
                         f"known: {sorted(MODELS)}")
    saved = torch.load(weights_path, map_location=device, weights_only=True)
    module = MODELS[config["model"]](**saved["config"]).to(device)
    module.load_state_dict(saved["state_dict"])
    return module, config
