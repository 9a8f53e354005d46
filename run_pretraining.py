#!/usr/bin/env python
"""Pretrain a Siamese encoder: `accelerate launch run_pretraining.py --config configs/<recipe>.yaml [--field value]`.

A thin command line over `hf_siamese.training.train`; `--help` lists every field.
"""

import logging
import os
import sys
from pathlib import Path

from hf_siamese.accelerator import launched_with_deepspeed
from hf_siamese.cli import parse_pretraining_args
from hf_siamese.training import train


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        config, data_args, train_args = parse_pretraining_args(argv)
    except (ValueError, OSError) as error:  # a recipe, a value or a path given wrong: one line naming it
        print(f"{Path(sys.argv[0]).name}: error: {error}", file=sys.stderr)
        sys.exit(2)  # argparse's status for a usage error
    result = train(config, data_args, train_args)
    print(f"Saved the pretrained model to {result.output_dir} after {result.global_step} steps "
          f"(last loss {result.loss:.4f}, {result.skipped_images} undecodable images skipped).")


def exit_before_interpreter_shutdown() -> None:
    """End the process without Python's shutdown, where a gloo worker thread that frees a tensor aborts it.

    DeepSpeed's engine stays referenced after training, so its process groups and their worker threads outlive
    ``main``; the model, its record and the trackers are saved and ended by then.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
    if launched_with_deepspeed():
        exit_before_interpreter_shutdown()
