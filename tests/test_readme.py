import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_quick_start_runs_as_written(tmp_path):
    """The saved folder must serve the pipeline line shown, so the whole block runs, pipeline included."""
    quick_start = README.read_text().split("## Quick start", 1)[1]
    code = re.search(r"```python\n(.*?)```", quick_start, re.S).group(1)
    assert 'pipeline("image-feature-extraction", model="byol-r18"' in code
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "torch.Size([2, 512])" in lines and lines[-1] == "512"  # the encoder's and the pipeline's feature widths
    assert (tmp_path / "byol-r18" / "model.safetensors").exists()
    assert (tmp_path / "byol-r18" / "preprocessor_config.json").exists()


def test_readme_cites_what_the_model_card_cites():
    from hf_siamese.model_card import CITATIONS

    assert CITATIONS in README.read_text()  # one source for both


def test_readme_table_is_what_its_marker_command_prints():
    """The results table is generated: the command in its marker reproduces it from the committed results."""
    from bench.fashion_mnist import results_table

    marker = re.search(r"<!-- python bench/fashion_mnist.py --readme_table --results (\S+) -->\n(.*?)<!-- end of table -->",
                       README.read_text(), re.S)
    assert marker and marker.group(2).strip() == results_table(README.parent / marker.group(1))


def test_readme_links_to_files_and_headings_that_exist():
    """Results moved to docs/benchmarks.md are reached by link, so every relative link and anchor must resolve."""
    for target, anchor in re.findall(r"\]\((?!https?:)([^)#]+)(?:#([^)]+))?\)", README.read_text()):
        path = README.parent / target
        assert path.exists(), target
        if anchor:
            headings = re.findall(r"^#+ (.+)$", path.read_text(), re.M)
            slugs = {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}
            assert anchor in slugs, f"{target}#{anchor}"


def test_readme_dense_transfer_block_runs_on_a_saved_model(tmp_path):
    """The UperNet lines, on a small model saved where the block expects the demo's."""
    from hf_siamese import SiameseConfig, SiameseForPreTraining

    block = README.read_text().split("## Dense transfer", 1)[1]
    code = re.search(r"```python\n(.*?)```", block, re.S).group(1)
    config = SiameseConfig(backbone="resnet18", framework="moco", image_size=28, num_channels=1, small_image_stem=True,
                           backbone_kwargs={"channels": [8, 16, 32, 64]}, projector_hidden_dim=32, projector_dim=16)
    model = SiameseForPreTraining(config)
    model.save_pretrained(tmp_path / "outputs" / "demo")
    code += ("\nimport torch\nlogits = model(pixel_values=torch.randn(2, 1, 32, 32)).logits\n"
             "print(tuple(logits.shape), hf_siamese.load_backbone_weights(model, 'outputs/demo'))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    shape, loaded = result.stdout.split(")")[0] + ")", int(result.stdout.split(")")[1])
    assert shape == "(2, 11, 32, 32)" and loaded == len(model.siamese.state_dict())  # every encoder tensor
