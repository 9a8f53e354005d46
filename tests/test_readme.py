import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_quick_start_runs_as_written(tmp_path):
    quick_start = README.read_text().split("## Quick start", 1)[1]
    code = re.search(r"```python\n(.*?)```", quick_start, re.S).group(1)
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "torch.Size([2, 512])" in result.stdout
    assert (tmp_path / "byol-r18" / "model.safetensors").exists()


def test_readme_cites_what_the_model_card_cites():
    from hf_siamese.model_card import CITATIONS

    assert CITATIONS in README.read_text()  # one source for both
