import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands():
    return re.findall(r"```bash\n(pip install torch==2\.13\.0 && .*?)\n```", (ROOT / "README.md").read_text())


def test_readme_gives_setup_and_test_commands_and_ci_runs_the_test_one():
    setup, test = readme_commands()[:2]
    assert setup.endswith("ppl-lvm demo")
    assert "pytest" in test
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test in ci_lines, "the README's test command must be what .ci/run runs"
