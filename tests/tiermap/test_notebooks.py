"""Every notebook in notebooks/ runs top to bottom in a fresh kernel of this interpreter, from its
own folder and with no PYTHONPATH, as a user opening it in Jupyter would."""

from __future__ import annotations

import ast
import json
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
KERNEL = "tiermap-tests-python3"
BUDGET_S = 120.0  # each notebook is meant to take < 60 s; this leaves room for a slow machine


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A kernelspec whose argv is this interpreter, so the kernel sees the same packages."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "tiermap tests", "language": "python",
    }))
    return root


def _code(path: Path) -> list[str]:
    nb = json.loads(path.read_text())
    return ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]


def test_there_are_the_three_notebooks() -> None:
    names = [p.stem for p in NOTEBOOKS]
    for prefix in ("01_quickstart", "02_sn40l", "03_flash_attention"):
        assert prefix in names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_defines_no_logic_of_its_own(path: Path) -> None:
    for source in _code(path):
        tree = ast.parse("\n".join(line for line in source.splitlines()
                                   if not line.lstrip().startswith(("%", "!"))))
        for node in ast.walk(tree):
            assert not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef
                                  | ast.Lambda | ast.For | ast.While), (
                f"{path.name}: notebooks only call tiermap and example builders; move "
                f"{type(node).__name__} logic into the library")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path, kernel_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("JUPYTER_PATH", str(kernel_dir))
    monkeypatch.delenv("PYTHONPATH", raising=False)
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=int(BUDGET_S), kernel_name=KERNEL,
                            resources={"metadata": {"path": str(path.parent)}})
    start = time.perf_counter()
    client.execute()
    elapsed_s = time.perf_counter() - start
    assert elapsed_s < BUDGET_S
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any("image/png" in o.get("data", {}) or "text/html" in o.get("data", {})
               for o in outputs), "a notebook shows at least one chart or plan"
