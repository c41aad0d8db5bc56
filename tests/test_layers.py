"""The core is engine-agnostic: it must import and work without vLLM."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "mc_vllm" / "core"


def test_core_sources_never_import_vllm():
    offenders = []
    for f in CORE.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{f.name}: {n}" for n in names if n.split(".")[0] == "vllm"]
    assert not offenders


def test_core_and_reference_import_with_vllm_blocked():
    code = (
        "import sys; sys.modules['vllm'] = None\n"
        "import mc_vllm.core.allocator, mc_vllm.core.tree, mc_vllm.core.storage\n"
        "import mc_vllm.core.gistnet, mc_vllm.core.lensnet, mc_vllm.reference\n"
        "assert 'vllm' not in {m.split('.')[0] for m in sys.modules if sys.modules[m]}\n"
    )
    root = str(CORE.parents[1])
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)
