"""Which data a run reads: one source per split, checked before anything loads, and recorded as read.

A split's images come from exactly one source: a dataset by name (the Hub, or ``fashion_mnist``), a local image
folder, or local parquet/webdataset files. Two sources for one split are an error naming both, never a silent
precedence; a path that cannot be what its field takes is an error naming the field and what it accepts.
"""

import glob
from pathlib import Path

# What each kind of source is called in the records (training_run.json, the model card).
DATASET, FOLDER, FILES = "dataset", "image folder", "files"
DATA_FILE_SUFFIXES = (".parquet", ".tar")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def check_one_source(sources: dict[str, object], what: str) -> str | None:
    """The one field of ``sources`` (field name -> value) that is set, ``None`` when none is.

    Raises ``ValueError`` naming both fields and values when two or more are set.
    """
    given = [(name, value) for name, value in sources.items() if value]
    if len(given) > 1:
        named = " and ".join(f"`{name}` {value!r}" for name, value in given)
        raise ValueError(f"{what} has two sources, {named}: give one (a dataset name, an image folder or data files).")
    return given[0][0] if given else None


def check_image_folder(path: str, field: str) -> Path:
    """``path`` as an existing directory; an error naming ``field`` when it does not exist or is a file."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"`{field}` {path!r}: the folder does not exist.")
    if not folder.is_dir():
        raise NotADirectoryError(f"`{field}` {path!r} is a file; it takes a folder of images (class subfolders "
                                 f"give labels). For parquet or webdataset files use the `*data_files` fields.")
    return folder


def resolve_data_files(pattern: str, field: str) -> list[str]:
    """The files a ``data_files`` glob matches, all parquet or all webdataset ``.tar``.

    A folder, a glob of images, or a glob that matches nothing is an error that says what the field takes.
    """
    accepts = f"`{field}` takes parquet or webdataset .tar files (a path or a glob like 'train/*.parquet')"
    if Path(pattern).expanduser().is_dir():
        raise ValueError(f"{accepts}; {pattern!r} is a folder: pass a folder of images as the matching `*_dir` "
                         f"field (`train_dir`, `eval_dir`), or name its files, e.g. '{pattern.rstrip('/')}/*.parquet'.")
    files = sorted(glob.glob(str(Path(pattern).expanduser()), recursive=True))
    if not files:
        raise FileNotFoundError(f"{accepts}; {pattern!r} matches no file.")
    suffixes = {Path(file).suffix.lower() for file in files}
    if suffixes & set(IMAGE_SUFFIXES):
        raise ValueError(f"{accepts}; {pattern!r} matches image files: put them in a folder (one subfolder per "
                         f"class for labels) and pass it as `train_dir` or `eval_dir`.")
    if len(suffixes) > 1 or not suffixes <= set(DATA_FILE_SUFFIXES):
        raise ValueError(f"{accepts}; {pattern!r} matches files ending in {sorted(suffixes)}.")
    return files


def data_files_builder(files: list[str]) -> str:
    """The ``datasets`` builder that reads ``files`` (already checked by :func:`resolve_data_files`)."""
    return "webdataset" if files[0].lower().endswith(".tar") else "parquet"


def source_record(kind: str, name: str, *, split: str | None = None, config: str | None = None,
                  files: list[str] | None = None, rows: int | None = None, streaming: bool = False) -> dict:
    """What a split read, as ``training_run.json`` and the model card give it."""
    record = {"kind": kind, "name": name, "split": split, "config": config, "rows": rows, "streaming": streaming}
    if files is not None:
        record["files"] = len(files)
    return {key: value for key, value in record.items() if value is not None}


def describe_source(record: dict) -> str:
    """One line for a log or a card: ``files 'x/*.parquet' (2 files, 96 rows)``."""
    details = [f"split {record['split']}" if record.get("split") else "",
               f"config {record['config']}" if record.get("config") else "",
               f"{record['files']} files" if "files" in record else "",
               f"{record['rows']:,} rows" if record.get("rows") is not None else "",
               "streamed" if record.get("streaming") else ""]
    details = ", ".join(detail for detail in details if detail)
    return f"{record['kind']} {record['name']}" + (f" ({details})" if details else "")
