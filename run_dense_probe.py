#!/usr/bin/env python
"""Probe a pretrained encoder on a dense task: semantic-segmentation mIoU of a frozen linear probe or of UperNet.

    python run_dense_probe.py --model_name_or_path outputs/demo [--protocol linear|upernet] [--probe_levels last|multi|2,3]
    python run_dense_probe.py recipe.yaml   # the same fields in a YAML file

A thin command line over `hf_siamese.dense_probe.run_dense_probe`; `--help` lists every field.
"""

import logging
import sys

from transformers import HfArgumentParser

import hf_siamese  # noqa: F401  (registers the Auto classes, the backbone included)
from hf_siamese.dense_probe import DenseProbeArguments, format_dense_results, run_dense_probe


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    argv = sys.argv[1:] if argv is None else argv
    parser = HfArgumentParser(DenseProbeArguments, description=__doc__.splitlines()[0])
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        (args,) = parser.parse_yaml_file(argv[0])
    else:
        (args,) = parser.parse_args_into_dataclasses(argv)
    print(format_dense_results(run_dense_probe(args)))


if __name__ == "__main__":
    main()
