"""scripts/check_imports.py: finds cycles and upward imports from the sources alone."""

from __future__ import annotations

from pathlib import Path

from script_util import load_script

ROOT = Path(__file__).resolve().parent.parent


def _script():
    return load_script("check_imports")


def _package(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / "lorakit" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_reports_a_cycle_with_the_lines_of_its_imports(tmp_path):
    check = _script()
    src = _package(tmp_path, {
        "__init__.py": "",
        "lora/__init__.py": "",
        "lora/a.py": "from lorakit.lora.b import x\n",
        "lora/b.py": "x = 1\n\ndef f():\n    from lorakit.lora import a  # lazy, still a dependency\n",
        "lora/c.py": "import lorakit.lora.a\n",
    })  # fmt: skip
    assert check.cycles(check.edges(src)) == [["lorakit.lora.a", "lorakit.lora.b"]]
    lines = check.report(src)
    assert lines[0] == "cycle among 2 modules: lorakit.lora.a, lorakit.lora.b"
    assert "    lorakit.lora.b (line 4) imports lorakit.lora.a" in lines
    assert check.main([str(src)]) == 1


def test_reports_upward_imports_and_ignores_type_checking_ones(tmp_path):
    check = _script()
    src = _package(tmp_path, {
        "__init__.py": "",
        "lora/__init__.py": "",
        "lora/layers.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from lorakit.training import t\n",
        "io/__init__.py": "",
        "io/files.py": "from ..training.t import run\n",  # relative imports resolve too
        "training/__init__.py": "",
        "training/t.py": "from lorakit.lora.layers import *\n\ndef run():\n    pass\n",
    })  # fmt: skip
    assert check.cycles(check.edges(src)) == []
    assert check.report(src) == [
        "upward import: lorakit.io.files [io] (line 1) imports lorakit.training.t [training]"
    ]


def test_a_clean_package_passes(tmp_path, capsys):
    check = _script()
    files = {"__init__.py": "", "lora/__init__.py": "", "lora/a.py": "import os\n",
             "methods/__init__.py": "from lorakit.lora import a\n"}
    src = _package(tmp_path, files)
    assert check.main([str(src)]) == 0
    assert "clean" in capsys.readouterr().out


def test_lorakit_imports_downward_only_and_has_no_cycles():
    """The whole package: no cycle, no import of a layer above the importer's own."""
    check = _script()
    src = ROOT / "src"
    edges = check.edges(src)
    assert check.cycles(edges) == []
    assert check.upward(edges) == []
    # The layers and kinds leaves import nothing of lorakit but errors (and arch, for layout facts).
    leaf = {e.target for e in edges if e.source in ("lorakit.lora.kinds", "lorakit.lora.arch")}
    assert leaf <= {"lorakit.errors"}
