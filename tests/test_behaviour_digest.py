"""Refactoring guard: a few deterministic training steps of each framework, with the designs that shape the
forward pass (ladder and its dense term, MultiCrop, MeanEnc), end where they ended when the digests were recorded.

Recorded with ``python tests/test_behaviour_digest.py --record`` (only when behaviour is meant to change).
"""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from images import structured_images  # noqa: E402
from test_training import TINY_MODEL, run, write_parquet  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures/behaviour_digest.json"
CASES = {
    "moco_multicrop_ladder": ["--framework", "moco", "--queue_size", "32", "--multicrop", "true",
                              "--multicrop_num_local", "2", "--multicrop_local_size", "16", "--ladder_levels", "[2, 4]"],
    "mocov3_meanenc": ["--framework", "mocov3", "--mean_encoding", "true"],
    "byol_ladder_dense": ["--framework", "byol", "--ladder_levels", "[3, 4]", "--ladder_dense_weight", "0.5"],
    "simsiam_multicrop": ["--framework", "simsiam", "--multicrop", "true", "--multicrop_num_local", "2",
                          "--multicrop_local_size", "16"],
}


def digest(case: str, work: Path) -> dict[str, list[float]]:
    """Each logged loss, and position-weighted sums of the saved parameters and of the buffers."""
    data_files = write_parquet(work / "data", structured_images(32), num_shards=1)
    output_dir = work / case
    run(["--data_files", data_files, "--output_dir", str(output_dir), "--per_device_train_batch_size", "8",
         "--report_to", "none", "--logging_steps", "1", "--max_steps", "3", "--learning_rate", "0.5",
         "--scale_learning_rate", "false", "--dataloader_num_workers", "0", "--seed", "0", *TINY_MODEL, *CASES[case]])
    losses = [json.loads(line)["loss"] for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    tensors = load_file(output_dir / "model.safetensors")
    buffers = {name for name in tensors if "running_" in name or name.rsplit(".", 1)[-1].startswith("queue")}

    def weighted_sum(names) -> float:
        total = 0.0
        for name in sorted(names):
            values = tensors[name].double().flatten()
            total += float(values @ torch.linspace(1, 2, len(values), dtype=torch.float64))
        return total

    return {"losses": losses, "parameters": [weighted_sum(set(tensors) - buffers)], "buffers": [weighted_sum(buffers)]}


@pytest.mark.parametrize("case", list(CASES))
def test_training_ends_where_the_recorded_digest_says(case, tmp_path):
    expected = json.loads(FIXTURE.read_text())[case]
    measured = digest(case, tmp_path)
    for key, values in expected.items():
        # Another CPU's kernels move a loss by about 1e-6: relative to SimSiam's losses near 0, that is over 1e-5.
        assert measured[key] == pytest.approx(values, rel=1e-5, abs=1e-5 if key == "losses" else None), key


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    import tempfile

    with tempfile.TemporaryDirectory() as work:
        digests = {case: digest(case, Path(work)) for case in CASES}
    FIXTURE.write_text(json.dumps(digests, indent=1) + "\n")
    print(json.dumps(digests, indent=1))
