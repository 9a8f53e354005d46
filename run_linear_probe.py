#!/usr/bin/env python
"""Probe a frozen encoder: kNN and linear classifiers on its features, accuracies in eval_results.json.

    python run_linear_probe.py --model_name_or_path outputs/demo --dataset_name fashion_mnist \
        [--protocol cached|augmented] [--probe_levels last|all|1,2,last] [--knn_k 20,200]

A thin command line over `hf_siamese.linear_probe.run_linear_probe`; `--help` lists every field.
"""

import logging

from transformers import HfArgumentParser

import hf_siamese  # noqa: F401  (registers the Auto classes)
from hf_siamese.linear_probe import ProbeArguments, format_results, run_linear_probe


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    (args,) = HfArgumentParser(ProbeArguments, description=__doc__.splitlines()[0]).parse_args_into_dataclasses(argv)
    results = run_linear_probe(args)
    print(format_results(results))


if __name__ == "__main__":
    main()
