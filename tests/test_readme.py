import re
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
