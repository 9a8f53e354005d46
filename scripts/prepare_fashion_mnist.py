"""Write Fashion-MNIST as parquet shards, ``{split}-{i:05d}-of-{n:05d}.parquet`` for the train and test splits.

The image column keeps the ``datasets.Image`` feature (PNG bytes), so that
``load_dataset("parquet", data_files=..., streaming=True)`` yields PIL images in "image" and ints in "label".
Shards of an earlier run with another ``--num_shards`` are removed, so that ``{split}-*.parquet`` globs stay exact.
"""

import argparse
from pathlib import Path

import datasets

from hf_siamese.fashion_mnist import load_fashion_mnist

SPLITS = ("train", "test")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--source_dir", type=Path, help="directory of the IDX files (default: the Debian package's)")
    parser.add_argument("--num_shards", type=int, default=4)
    args = parser.parse_args(argv)
    if args.num_shards < 1:
        parser.error("--num_shards must be at least 1")
    datasets.disable_progress_bars()
    args.output_dir.mkdir(parents=True, exist_ok=True)
    num_rows = 0
    for split in SPLITS:
        dataset = load_fashion_mnist(split, args.source_dir)
        paths = [args.output_dir / f"{split}-{i:05d}-of-{args.num_shards:05d}.parquet" for i in range(args.num_shards)]
        for stale in set(args.output_dir.glob(f"{split}-?????-of-?????.parquet")) - set(paths):
            stale.unlink()
            print(f"removed stale {stale}")
        for index, path in enumerate(paths):
            shard = dataset.shard(args.num_shards, index, contiguous=True)
            shard.to_parquet(str(path))
            print(f"wrote {path} ({len(shard)} rows)")
        num_rows += len(dataset)
    print(f"Fashion-MNIST: {num_rows} rows in {len(SPLITS) * args.num_shards} parquet files under {args.output_dir}")


if __name__ == "__main__":
    main()
