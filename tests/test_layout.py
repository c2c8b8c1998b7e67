"""The package's layout as STYLE.md states it: data flows one way, with no import cycle, and no
model file imports the trainer."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ppl_lvm"


def imports_of(path):
    """Modules of the package that ``path`` imports anywhere: at module level and inside functions
    (an import inside a function is still an edge of the graph, and can still close a cycle)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ppl_lvm"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("ppl_lvm"))
    return found


def graph():
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(("ppl_lvm",) + path.relative_to(PACKAGE).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    return {name: {m for m in imports_of(path) if m in modules and m != name}
            for name, path in modules.items()}


def test_no_import_cycle():
    edges = {n: d for n, d in graph().items() if n != "ppl_lvm"}  # __init__ re-exports all
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in edges.get(node, ()):
            if nxt == "ppl_lvm":
                continue
            if state.get(nxt) == "open":
                raise AssertionError(f"import cycle: {' -> '.join(stack + [node, nxt])}")
            if nxt not in state:
                visit(nxt, stack + [node])
        state[node] = "done"

    for node in edges:
        if node not in state:
            visit(node, [])


def test_program_is_a_leaf():
    assert graph()["ppl_lvm.program"] == set()


def test_the_density_kernel_stands_on_the_program_only():
    assert graph()["ppl_lvm.densities"] - {"ppl_lvm"} <= {"ppl_lvm.program"}


def test_no_module_getattr_shims():
    """Old import paths live as plain re-exports that import downward, not as a module
    ``__getattr__`` that imports upward at attribute access (a cycle the graph cannot see)."""
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = [n.name for n in tree.body if isinstance(n, ast.FunctionDef)]
        assert "__getattr__" not in names, f"{path.relative_to(PACKAGE)} defines __getattr__"


def test_model_files_do_not_import_the_trainer():
    for name, deps in graph().items():
        if name.startswith("ppl_lvm.models."):
            assert "ppl_lvm.train" not in deps, f"{name} imports ppl_lvm.train"


def test_import_leaves_optional_libraries_unloaded():
    # scikit-learn's clustering module alone cost ~1 s and ~100 MB at `import ppl_lvm`
    import subprocess
    import sys

    code = ("import sys, ppl_lvm; print(sorted(m for m in ('sklearn', 'matplotlib', 'mlxtend', "
            "'pandas', 'scipy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=PACKAGE.parent)
    assert out.stdout.strip() == "[]"


# the one place that sums a trace's log-densities (issue 18): a trace's site log-probs, the
# replayed trace pair and Pyro's per-trace sums are read in ppl_lvm/densities.py only. Closed-form
# model code (a mixture's or PPCA's own density) is the model's math, not a trace's, and is free.
TRACE_DENSITY_PATTERNS = ("poutine.replay(", "log_prob_sum", '["fn"].log_prob', "['fn'].log_prob",
                          "unscaled_log_prob", "compute_log_prob", "pack_tensors",
                          "contract_to_tensor", "site_log_prob(")


def test_only_the_kernel_sums_a_traces_log_densities():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "densities.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if any(pattern in code for pattern in TRACE_DENSITY_PATTERNS) and \
                    "densities." not in code:
                offenders.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    assert not offenders, "log-densities summed outside ppl_lvm/densities.py:\n" + "\n".join(
        offenders)
