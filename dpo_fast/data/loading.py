"""Loading preference data from files, save_to_disk directories, the hub or memory, with one-line
errors for bad files (file, line, problem) before `datasets` sees them."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

_DATA_SUFFIXES = {
    ".json": "json", ".jsonl": "json", ".ndjson": "json",
    ".parquet": "parquet", ".pq": "parquet",
    ".csv": "csv", ".tsv": "csv",
    ".arrow": "arrow",
}


class DataFileError(ValueError):
    """A data file that cannot be read as preference data: one line naming the file, the line
    (when there is one) and the problem."""

    def __init__(self, path, problem: str, line: int | None = None):
        self.path, self.line, self.problem = str(path), line, problem
        super().__init__(f"{path}{f':{line}' if line is not None else ''}: {problem}")


def _utf8_text(path: Path) -> str:
    """The file as text; a byte that is not UTF-8 is named by its line and column."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataFileError(path, f"not UTF-8 text (byte 0x{data[e.start]:02x} at column {column}); save the file as "
                            "UTF-8", line) from None


def _check_json_file(path: Path) -> None:
    """A JSON array / object file, or JSON lines: every non-blank line must parse (line numbers)."""
    text = _utf8_text(path)
    if not text.strip():
        raise DataFileError(path, "empty file (no rows)")
    stripped = text.lstrip()
    if stripped[0] in "[" or (stripped[0] == "{" and path.suffix.lower() == ".json"):
        try:
            json.loads(text)
            return
        except json.JSONDecodeError as e:
            if stripped[0] == "[":
                raise DataFileError(path, f"invalid JSON ({e.msg}, column {e.colno})", e.lineno) from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataFileError(path, f"invalid JSON ({e.msg}, column {e.colno})", number) from None
        if not isinstance(row, dict):
            raise DataFileError(path, f"expected a JSON object per line, got {type(row).__name__}", number)


def _check_csv_file(path: Path, delimiter: str) -> None:
    """A header and at least one row, every row with the header's number of fields."""
    with io.StringIO(_utf8_text(path), newline="") as f:
        rows = csv.reader(f, delimiter=delimiter)
        header = next(rows, None)
        if not header:
            raise DataFileError(path, "empty file (no header, no rows)")
        count = 0
        for row in rows:
            if not row:
                continue
            count += 1
            if len(row) != len(header):
                raise DataFileError(path, f"{len(row)} fields, the header has {len(header)} ({', '.join(header)})",
                                    rows.line_num)
    if count == 0:
        raise DataFileError(path, f"header only ({', '.join(header)}), no rows")


def check_data_file(path: Path) -> None:
    """Refuse an empty or malformed uncompressed JSON/JSONL/CSV/TSV file with its line number
    (datasets would raise StopIteration or a generic generation error). Other types go as they are."""
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl", ".ndjson"):
        _check_json_file(path)
    elif suffix in (".csv", ".tsv"):
        _check_csv_file(path, "\t" if suffix == ".tsv" else ",")
    elif path.stat().st_size == 0:
        raise DataFileError(path, "empty file (no rows)")


def row_line(path: Path, row: int) -> int | None:
    """The line of a JSON-lines or CSV file that holds data row `row` (0-based), or None."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson", ".json"):
        numbers = [n for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
        if suffix == ".json" and numbers and path.read_text(encoding="utf-8").lstrip()[:1] == "[":
            return None  # a JSON array: rows have no lines of their own
        return numbers[row] if row < len(numbers) else None
    if suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as f:
            rows = csv.reader(f, delimiter="\t" if suffix == ".tsv" else ",")
            next(rows, None)
            for index, _ in enumerate(rows):
                if index == row:
                    return rows.line_num
    return None


def split_offset(split: str) -> int:
    """The first row a split like "train[100:200]" takes from its data (0 without a slice)."""
    m = _SLICE.match(split)
    start = m.group(2) if m else None
    return int(start) if start and int(start) > 0 else 0


def _data_builder(path: Path) -> tuple[str, dict]:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in (".gz", ".bz2", ".xz", ".zst", ".zip"):
        suffixes = suffixes[:-1]
    if not suffixes or suffixes[-1] not in _DATA_SUFFIXES:
        raise ValueError(
            f"{path}: unknown data file type; expected one of {sorted(_DATA_SUFFIXES)} "
            "(optionally compressed), or a directory written by Dataset.save_to_disk"
        )
    builder = _DATA_SUFFIXES[suffixes[-1]]
    return builder, ({"delimiter": "\t"} if suffixes[-1] == ".tsv" else {})


_SLICE = re.compile(r"^(\w[\w.-]*)(?:\[(-?\d*):(-?\d*)\])?$")


def _pick_split(dd, split: str, source):
    """dd[split] for a DatasetDict; supports integer slices such as "train[:100]"."""
    m = _SLICE.match(split)
    if not m:
        raise ValueError(f"split: expected a name or a name with an integer slice like 'train[:100]', got {split!r}")
    base, start, stop = m.groups()
    if base not in dd:
        raise ValueError(f"{source}: no split {base!r}; available splits: {sorted(dd.keys())}")
    ds = dd[base]
    if start or stop:
        ds = ds.select(range(len(ds))[slice(int(start) if start else None, int(stop) if stop else None)])
    return ds


def load_preference_data(source, split: str = "train", *, revision: str | None = None, **kwargs):
    """Load preference data as a `datasets.Dataset`.

    source: a local data file (.json, .jsonl, .parquet, .csv, .tsv, .arrow, optionally
        compressed); a directory written by `save_to_disk` (a Dataset or a DatasetDict);
        a directory of data files; a hub dataset name (needs the network); or data already in
        memory: a `datasets.Dataset` / `DatasetDict`, a list of dicts or a pandas DataFrame.
    split: which split ("train", "test", slices like "train[:1000]"). A single data file is
        loaded under the split name given, whatever it is.
    revision: the hub revision (hub names only). Other keyword arguments go to `load_dataset`.
    """
    import datasets

    if isinstance(source, datasets.Dataset):
        return source
    if isinstance(source, datasets.DatasetDict):
        return _pick_split(source, split, "DatasetDict")
    if isinstance(source, list):
        return datasets.Dataset.from_list(source)
    if type(source).__name__ == "DataFrame":
        return datasets.Dataset.from_pandas(source, preserve_index=False)
    if not isinstance(source, (str, Path)):
        raise TypeError(f"source: expected a path, a hub name or a Dataset, got {type(source).__name__}")

    path = Path(source).expanduser()
    if path.is_dir():
        if any((path / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                return _pick_split(loaded, split, path)
            if "[" in split:
                return _pick_split(datasets.DatasetDict({split.split("[", 1)[0]: loaded}), split, path)
            return loaded
        return datasets.load_dataset(str(path), split=split, **kwargs)
    if path.is_file():
        builder, extra = _data_builder(path)
        check_data_file(path)
        base = split.split("[", 1)[0]
        try:
            return datasets.load_dataset(builder, data_files={base: str(path)}, split=split, **extra, **kwargs)
        except datasets.exceptions.DatasetGenerationError as e:
            raise DataFileError(path, f"cannot be read as {builder} ({e.__cause__ or e})") from None
    text = str(source)
    if text.startswith((".", "/", "~")) or path.suffix.lower() in _DATA_SUFFIXES:
        raise FileNotFoundError(f"preference data not found: {source}")
    return datasets.load_dataset(text, split=split, revision=revision, **kwargs)
