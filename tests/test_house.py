"""What the command lines and the code's layout show a new user: progress bars that do not flood a log, and
imports inside each domain (toy/, sd/) that run one way."""
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from toy import run

ROOT = Path(__file__).resolve().parents[1]


def log_lines(text: str) -> list[str]:
    """The lines a log shows: tqdm rewrites its bar with carriage returns, so both \\r and \\n end one."""
    return [line for line in re.split(r"[\r\n]", text) if line.strip()]


def test_a_run_with_stderr_to_a_file_leaves_a_few_lines(tmp_path):
    log = tmp_path / "e.log"
    with log.open("w") as err:
        rc = subprocess.run([sys.executable, "-m", "toy.run", "--train-steps", "300"], cwd=ROOT, stderr=err,
                            stdout=subprocess.DEVNULL, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
                                                            "PATH": "/usr/bin:/bin"}).returncode
    assert rc == 0
    lines = log_lines(log.read_text())
    assert len(lines) < 20, lines[:5]


@pytest.mark.parametrize("module", ["toy.run", "sd.config"])
def test_progress_off_a_terminal_refreshes_at_most_every_few_seconds(module, monkeypatch):
    mod = pytest.importorskip(module) if module == "sd.config" else run
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    bar = mod.progress(total=10, desc="x", leave=False)
    assert bar.mininterval >= 10 and bar.leave  # a log keeps its last line
    bar.close()


def _imports(path: Path, package: str, modules: set) -> set:
    """The modules of `package` that `path` imports anywhere in it (function-level imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith(package + ".")}
        elif isinstance(node, ast.ImportFrom) and node.module == package:
            out |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(package + "."):
            out.add(node.module.split(".")[1])
    return out


def import_cycle(package: str) -> list:
    """A cycle in the import graph of one package's modules, as a list of module names, or [] if there is none."""
    files = {p.stem: p for p in (ROOT / package).glob("*.py") if p.stem != "__init__"}
    graph = {m: _imports(p, package, set(files)) - {m} for m, p in files.items()}
    state: dict = {}

    def visit(m, path):
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return path[path.index(n):] + [n]
            if n not in state and (found := visit(n, path + [n])):
                return found
        state[m] = "done"
        return []
    for m in sorted(graph):
        if m not in state and (found := visit(m, [m])):
            return found
    return []


@pytest.mark.parametrize("package", ["toy", "sd"])
def test_no_import_cycle_inside_a_domain(package):
    assert import_cycle(package) == []


def test_the_cycle_finder_finds_a_cycle(tmp_path, monkeypatch):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("from pkg import b\n")
    (tmp_path / "pkg" / "b.py").write_text("def f():\n    from pkg.a import g\n")
    (tmp_path / "pkg" / "c.py").write_text("import pkg.a\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert import_cycle("pkg") in (["a", "b", "a"], ["b", "a", "b"])
