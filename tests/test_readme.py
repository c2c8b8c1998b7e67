import re
import shlex
import shutil
from pathlib import Path

import pyro
import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_gives_setup_and_test_commands_and_ci_runs_the_test_one():
    setup, test = re.findall(r"```bash\n(pip install torch==2\.13\.0 --index-url "
                             r"https://download\.pytorch\.org/whl/cpu && .*?)\n```", README)[:2]
    assert setup.endswith("ppl-lvm demo")
    assert "pytest" in test
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test in ci_lines, "the README's test command must be what .ci/run runs"


def test_readme_example_model_trains():
    example = re.search(r"```python\n(import pyro.*?)```", README, re.S).group(1)
    assert "fit(model, guide" in example
    example = example.replace("epochs=5", "epochs=1").replace("x[:4000]", "x[:256]").replace(
        "x[4000:]", "x[4000:4020]")
    namespace = {}
    pyro.clear_param_store()
    exec(compile(example, "README.md", "exec"), namespace)
    losses = namespace["result"].losses
    assert len(losses) == 2 and all(loss == loss for loss in losses)
    held_out = namespace["held_out"]
    assert held_out.log_px.shape == (20,) and held_out.globals == "given"
    assert bool(torch.isfinite(held_out.log_px).all())


def test_readme_shows_the_example_model_file_as_it_is():
    """The README's model-file section is examples/my_model.py verbatim (which test_cli trains)."""
    example = (ROOT / "examples" / "my_model.py").read_text()
    assert f"```python\n{example}```" in README


def readme_commands():
    """Every `ppl-lvm ...` line of the README's bash blocks, in order, continuations joined and
    comments dropped (the pip lines are CI's own run; torchrun's in tests/test_distributed.py)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words and words[0] == "ppl-lvm":
                commands.append(words[1:])
    return commands


def test_every_readme_command_runs_as_written(tmp_path, monkeypatch, capsys):
    """The README's commands exactly as written, one after another in a fresh folder (a fresh
    clone's examples/ beside them), shrunk to seconds by PPL_LVM_SMOKE=1: each must succeed."""
    from ppl_lvm.cli import main

    commands = readme_commands()
    assert len(commands) >= 12 and ["demo"] in commands
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PPL_LVM_SMOKE", "1")
    for argv in commands:
        assert main(argv) == 0, (argv, capsys.readouterr().err[-2000:])
    assert (tmp_path / "compare.png").is_file() and (tmp_path / "runs" / "demo" / "model.pt").is_file()
    assert main(["train", "--config", "examples/config.toml", "--out", "runs/from-config"]) == 0
    assert (tmp_path / "runs" / "from-config" / "model.pt").is_file()
