"""Run a Python snippet in a fresh interpreter where `hf_siamese` cannot be imported, as on a user's machine."""

import subprocess
import sys
import textwrap
from pathlib import Path

BLOCK_HF_SIAMESE = """
import importlib.abc, sys

class BlockHfSiamese(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "hf_siamese" or name.startswith("hf_siamese."):
            raise ImportError("hf_siamese is blocked in this test")

sys.meta_path.insert(0, BlockHfSiamese())
try:
    import hf_siamese
    raise SystemExit("hf_siamese was importable")
except ImportError:
    pass
"""


def run_without_hf_siamese(script: str, workdir: Path) -> str:
    """stdout of ``script``; fails the test with the subprocess's output when it exits non-zero."""
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(workdir / "hf_home"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", BLOCK_HF_SIAMESE + textwrap.dedent(script)], cwd=workdir, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout
