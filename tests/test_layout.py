"""The package's layout as STYLE.md states it: data flows one way, with no import cycle, and no
model file imports the trainer."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ppl_lvm"


def imports_of(path, source=None):
    """Modules of the package that ``path`` imports anywhere: at module level and inside functions
    (an import inside a function is still an edge of the graph, and can still close a cycle).
    ``from ppl_lvm import densities`` is an edge to ppl_lvm.densities (a submodule), not to the
    package's ``__init__``; ``from ppl_lvm import fit`` is an edge to ``__init__`` itself."""
    tree = ast.parse(path.read_text() if source is None else source)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ppl_lvm"):
            submodules = {f"{node.module}.{a.name}" for a in node.names} & MODULES
            found.update(submodules)
            if len(submodules) < len(node.names):  # a name of the module itself
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("ppl_lvm"))
    return found


def module_paths():
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(("ppl_lvm",) + path.relative_to(PACKAGE).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    return modules


MODULES = set(module_paths())


def graph():
    modules = module_paths()
    return {name: {m for m in imports_of(path) if m in modules and m != name}
            for name, path in modules.items()}


# The one-way order of STYLE.md, as ranks: a module imports (anywhere, inside functions too) only
# modules of its own rank or lower, so data flows program -> the density kernel -> guides /
# objectives / estimators / AIS / completion -> fit and the recipes -> the command line. A new
# module needs a rank here (the test says so), which is where its place in the house is decided.
RANKS = {
    # 0: leaves that know nothing of the package: a program's structure, plates, numerics, I/O
    "ppl_lvm.program": 0, "ppl_lvm.plate": 0, "ppl_lvm.psis": 0, "ppl_lvm.atomic": 0,
    "ppl_lvm.progress": 0, "ppl_lvm.threads": 0, "ppl_lvm.data": 0, "ppl_lvm.vocabulary": 0,
    # 1: the density kernel and what stands on the program alone; models (programs, nothing else)
    "ppl_lvm.densities": 1, "ppl_lvm.compiled": 1, "ppl_lvm.particles": 1,
    "ppl_lvm.models": 1, "ppl_lvm.models.vae": 1, "ppl_lvm.models.ppca": 1,
    "ppl_lvm.models.mog": 1, "ppl_lvm.models.missing": 1,
    "ppl_lvm.optim": 1,  # Adam and the one step-size schedule: fit's, and refine's (rank 2)
    # 2: guide kinds, losses, estimators of log p(x), AIS, completion: all on the kernel
    "ppl_lvm.guides": 2, "ppl_lvm.objectives": 2, "ppl_lvm.estimators": 2, "ppl_lvm.ais": 2,
    "ppl_lvm.completion": 2,
    # 3: what trains: fit and its pieces, and the recipes that call it
    "ppl_lvm.checkpoint": 3, "ppl_lvm.distributed": 3, "ppl_lvm.train": 3,
    "ppl_lvm.recipes": 3, "ppl_lvm.mixtures": 3, "ppl_lvm.checks": 3,
    # 4: the fronts: experiments, run folders, figures, the command line, the public API
    "ppl_lvm.experiment": 4, "ppl_lvm.runs": 4, "ppl_lvm.plots": 4, "ppl_lvm.cli": 4,
    "ppl_lvm.__main__": 4, "ppl_lvm": 4,
}


def order_violations(edges, ranks):
    """Every import that goes up the order: "a (rank i) imports b (rank j > i)", and every module
    without a rank. ``edges``: {module: set of modules it imports}."""
    problems = [f"{name} has no rank in RANKS" for name in sorted(edges) if name not in ranks]
    for name in sorted(edges):
        for target in sorted(edges[name]):
            if name in ranks and target in ranks and ranks[target] > ranks[name]:
                problems.append(f"{name} (rank {ranks[name]}) imports {target} "
                                f"(rank {ranks[target]})")
    return problems


def find_cycle(edges):
    """One import cycle as a list of modules [a, b, ..., a], or None."""
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack + [node] + [nxt]
            if nxt not in state:
                found = visit(nxt, stack + [node])
                if found:
                    return found
        state[node] = "done"
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node, [])
            if found:
                return found[found.index(found[-1]):]
    return None


def test_no_import_cycle():
    cycle = find_cycle(graph())
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_imports_follow_the_one_way_order():
    problems = order_violations(graph(), RANKS)
    assert not problems, "imports against the one-way order:\n" + "\n".join(problems)


def test_the_checkers_on_a_tiny_graph():
    ranks = {"kernel": 0, "guides": 1, "fit": 2}
    good = {"kernel": set(), "guides": {"kernel"}, "fit": {"guides", "kernel"}}
    assert order_violations(good, ranks) == [] and find_cycle(good) is None
    upward = dict(good, guides={"kernel", "fit"})  # guides -> fit goes up: 1 -> 2
    assert order_violations(upward, ranks) == ["guides (rank 1) imports fit (rank 2)"]
    assert find_cycle(upward) == ["fit", "guides", "fit"]  # found from the first name in order
    assert order_violations(dict(good, new=set()), ranks) == ["new has no rank in RANKS"]
    same_rank_circle = {"start": {"a"}, "a": {"b"}, "b": {"c"}, "c": {"a"}}
    assert order_violations(same_rank_circle, dict.fromkeys(same_rank_circle, 0)) == []
    assert find_cycle(same_rank_circle) == ["a", "b", "c", "a"]


def test_a_wrong_import_inside_a_function_is_caught():
    # guides.py with one upward import hidden in a function body: the order test must see it
    path = PACKAGE / "guides.py"
    source = path.read_text() + "\n\ndef _late():\n    from ppl_lvm.train import fit\n    return fit\n"
    edges = dict(graph(), **{"ppl_lvm.guides": imports_of(path, source) - {"ppl_lvm.guides"}})
    assert order_violations(edges, RANKS) == [
        "ppl_lvm.guides (rank 2) imports ppl_lvm.train (rank 3)"]
    # and ``from ppl_lvm import X`` is an edge to the submodule X, or to __init__ for a name
    assert imports_of(path, "from ppl_lvm import densities, fit\n") == {"ppl_lvm.densities",
                                                                       "ppl_lvm"}


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
