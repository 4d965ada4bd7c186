"""The import graph: no cycles between olm's files (lazy imports included), the registry on the ground floor, and
a check path that answers before the training stack loads."""

import ast
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("lightning", "transformers", "lm_eval", "scipy")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """File -> the olm files it imports anywhere in its body (a module inside a function counts too)."""
    files = {module_name(p): p for p in (ROOT / "olm").rglob("*.py")}

    def resolve(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {resolve(a.name) for a in node.names if a.name.split(".")[0] == "olm"}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parent, base] if base else parent)
                if base.split(".")[0] == "olm":
                    targets |= {resolve(f"{base}.{a.name}") for a in node.names}
            elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args
                  and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith("olm")):
                targets.add(resolve(node.args[0].value))
        graph[name] = targets - {None, name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one file (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_between_olm_files():
    graph = import_graph()
    assert "olm.train.run" in graph["olm.train.cli"]  # imported inside a function: lazy imports are edges too
    found = cycles(graph)
    shown = "; ".join(" <-> ".join(c) + " (" + ", ".join(f"{v} -> {sorted(graph[v] & set(c))}" for v in c) + ")"
                      for c in found)
    assert not found, f"import cycles: {shown}"


def test_the_registry_imports_nothing_of_olm_but_the_errors():
    assert import_graph()["olm.registry"] == {"olm.errors"}


def test_olm_nn_imports_only_the_registry_and_itself():
    graph = import_graph()
    for name, targets in graph.items():
        if name.startswith("olm.nn"):
            outside = {t for t in targets if not t.startswith("olm.nn")} - {"olm.registry", "olm.errors"}
            assert not outside, (name, outside)


CHECK_PATH = r"""
import contextlib, io, json, os, sys
from olm.train import cli
model_dir, heavy = sys.argv[1], json.loads(sys.argv[2])
answers = {}
def olm_train(*argv):
    sys.argv = ["olm-train", *argv]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.main()
            code = 0
        except SystemExit as exc:
            code = exc.code
    return code, (err.getvalue() or out.getvalue()).strip().splitlines()[:1]
answers["typo"] = olm_train("model=lm_tinny")
answers["typo -m"] = olm_train("-m", "model=lm_tiny,lm_tinny")
answers["bad key --cfg job"] = olm_train("--cfg", "job", "optim.lrr=1")
answers["help"] = olm_train("--help")
from olm.cli import main as olm
with contextlib.redirect_stdout(io.StringIO()):
    answers["models"] = olm(["models"]), []
    answers["components"] = olm(["components"]), []
with contextlib.redirect_stderr(io.StringIO()):
    answers["eval typo"] = olm(["eval", model_dir, "--tasks", "olm_nextlin"]), []
answers["heavy"] = sorted({m.split(".")[0] for m in sys.modules} & set(heavy))
print(json.dumps(answers))
"""


def test_the_check_path_imports_no_training_stack(tmp_path):
    """A typo, --help, a bad key under --cfg job, a sweep with a bad job, `olm models`, `olm components` and an
    unknown olm task are answered with nothing of Lightning, transformers, lm-eval or scipy imported."""
    import olm

    model_dir = olm.build_model(dict(vocab_size=256, embed_dim=8, num_heads=2, num_layers=1, max_seq_len=8)).save(
        tmp_path / "model")
    done = subprocess.run([sys.executable, "-c", CHECK_PATH, str(model_dir), json.dumps(HEAVY)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    answers = json.loads(done.stdout.strip().splitlines()[-1])
    assert answers.pop("heavy") == []
    assert answers["typo"][0] == 2 and "did you mean 'lm_tiny'?" in answers["typo"][1][0]
    assert answers["typo -m"][0] == 2 and "lm_tinny" in answers["typo -m"][1][0]
    assert answers["bad key --cfg job"][0] == 2 and "did you mean 'lr'?" in answers["bad key --cfg job"][1][0]
    assert answers["help"][0] == 0 and answers["help"][1][0].startswith("olm-train:")
    assert answers["models"][0] == 0 and answers["components"][0] == 0
    assert answers["eval typo"][0] == 2
