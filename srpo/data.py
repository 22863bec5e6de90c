"""Prompt lists from files, datasets folders or inline lists, with one-line errors for bad input.

``load_prompts(spec, what, column)`` is the one entry point. ``spec`` is

* ``None``: no prompts (``[]``);
* a list: the prompts themselves (stripped; blank entries dropped);
* a path, read by its form:

  - a folder: a local Hugging Face ``datasets`` folder written by ``Dataset.save_to_disk``, read
    with ``datasets.load_from_disk`` only (never a download, never remote code). A ``DatasetDict``
    folder gives its ``train`` split (or its only split); for another split point at the split's
    own folder, e.g. ``data.eval_prompts: my_prompts/validation``;
  - ``*.jsonl``: one JSON object per line, the prompt under the key ``column``; blank lines skipped;
  - ``*.csv``: a header row, then one row per prompt, the prompt in the column ``column``;
  - ``*.parquet``: the prompt in the column ``column`` (needs pyarrow);
  - any other file: plain UTF-8 text, one prompt per line; blank lines and lines starting with
    ``#`` are skipped.

In the column forms every value must be a non-empty string (surrounding whitespace is stripped);
a row that is not names its line or row. ``what`` names the prompts in error messages ("prompts",
"eval prompts"). pyarrow and datasets are imported only for the forms that need them.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from .errors import UserError

EXTRA = "pip install 'srpo[data]'"


def load_prompts(spec: str | list[str] | None, what: str = "prompts", column: str = "prompt") -> list[str]:
    if spec is None:
        return []
    if isinstance(spec, list):
        prompts = [str(p).strip() for p in spec if str(p).strip()]
        if not prompts:
            raise UserError(f"{what}: the inline list is empty; give at least one prompt")
        return prompts
    path = Path(spec)
    if path.is_dir():
        return _from_datasets_folder(path, what, column)
    if not path.is_file():
        raise UserError(f"{what} file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _from_jsonl(path, what, column)
    if suffix == ".csv":
        return _from_csv(path, what, column)
    if suffix == ".parquet":
        return _from_parquet(path, what, column)
    return _from_text(path, what)


def _brief(e: BaseException) -> str:
    """An exception as one short line: its class and the first line of its message."""
    lines = str(e).strip().splitlines()
    msg = lines[0].strip() if lines else ""
    if len(msg) > 200:
        msg = msg[:197] + "..."
    return f"{e.__class__.__name__}: {msg}" if msg else e.__class__.__name__


def _names(names) -> str:
    names = [str(n) for n in names]
    if not names:
        return "none"
    shown = ", ".join(repr(n) for n in names[:20])
    return shown + (f" and {len(names) - 20} more" if len(names) > 20 else "")


def _no_column(what: str, where: str, column: str, have) -> UserError:
    return UserError(f"{what} {where} has no column {column!r} (its columns: {_names(have)}): "
                     f"set data.prompt_column to the column holding the prompts")


def _value(what: str, where: str, column: str, value) -> str:
    """One column value as a prompt, or a UserError naming ``where`` (a file and its line or row)."""
    if not isinstance(value, str):
        kind = "null" if value is None else type(value).__name__
        raise UserError(f"{what} {where}: the {column!r} value is {kind}, not text: "
                        f"give every row a non-empty string prompt")
    value = value.strip()
    if not value:
        raise UserError(f"{what} {where}: the {column!r} value is empty: give every row a non-empty prompt "
                        f"(or drop the row)")
    return value


def _read_text(path: Path, what: str, encoding: str = "utf-8") -> str:
    try:
        return path.read_text(encoding=encoding)
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{what} file {path} is not readable UTF-8 text: {e.__class__.__name__}") from None


def _from_text(path: Path, what: str) -> list[str]:
    lines = _read_text(path, what).splitlines()
    prompts = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise UserError(f"{what} file {path} has no prompts: write one prompt per line")
    return prompts


def _from_jsonl(path: Path, what: str, column: str) -> list[str]:
    prompts = []
    for n, line in enumerate(_read_text(path, what, "utf-8-sig").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"file {path} line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{what} {where} is not valid JSON ({e.msg} at column {e.colno}): "
                            f"write one JSON object per line") from None
        if not isinstance(row, dict):
            raise UserError(f"{what} {where} is a JSON {type(row).__name__}, not an object: "
                            f'write one JSON object per line, e.g. {{"{column}": "a red apple"}}')
        if column not in row:
            raise _no_column(what, where, column, row)
        prompts.append(_value(what, where, column, row[column]))
    if not prompts:
        raise UserError(f"{what} file {path} has no prompts: write one JSON object per line, "
                        f'e.g. {{"{column}": "a red apple"}}')
    return prompts


def _from_csv(path: Path, what: str, column: str) -> list[str]:
    text = _read_text(path, what, "utf-8-sig")
    reader = csv.reader(text.splitlines(keepends=True), strict=True)  # bad quoting is an error
    try:
        header = next(reader, None)
        if header is None or not any(h.strip() for h in header):
            raise UserError(f"{what} file {path} is empty: write a header row naming the columns "
                            f"(one of them {column!r}), then one row per prompt")
        header = [h.strip() for h in header]
        if column not in header:
            raise _no_column(what, f"file {path}", column, header)
        i = header.index(column)
        prompts = []
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # a blank line
            where = f"file {path} line {reader.line_num}"
            if len(row) != len(header):
                raise UserError(f"{what} {where} has {len(row)} fields but the header has {len(header)}: "
                                f"quote values that hold commas")
            prompts.append(_value(what, where, column, row[i]))
    except csv.Error as e:
        raise UserError(f"{what} file {path} is not a readable CSV file (line {reader.line_num}: {e}): "
                        f"put values holding commas, quotes or line breaks in double quotes, inner quotes doubled") from None
    if not prompts:
        raise UserError(f"{what} file {path} has a header but no rows: write one row per prompt")
    return prompts


def _from_parquet(path: Path, what: str, column: str) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{what} file {path} is a .parquet file, which needs pyarrow: {EXTRA}") from None
    try:
        pf = pq.ParquetFile(path)
        names = pf.schema_arrow.names
        if column not in names:
            raise _no_column(what, f"file {path}", column, names)
        values = pf.read(columns=[column]).column(column).to_pylist()
    except UserError:
        raise
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... on a damaged file
        raise UserError(f"{what} file {path} is not a readable parquet file ({_brief(e)}): "
                        f"write it again, e.g. with pandas DataFrame.to_parquet") from None
    return _from_column(values, what, f"file {path}", column)


def _from_column(values: list, what: str, where: str, column: str) -> list[str]:
    if not values:
        raise UserError(f"{what} {where} has no rows: give at least one prompt")
    return [_value(what, f"{where} row {i} (0-based)", column, v) for i, v in enumerate(values)]


def _from_datasets_folder(path: Path, what: str, column: str) -> list[str]:
    is_dict = (path / "dataset_dict.json").is_file()
    if not is_dict and not ((path / "state.json").is_file() and (path / "dataset_info.json").is_file()):
        raise UserError(f"{what}: {path} is a folder but not a Hugging Face datasets folder (no state.json and "
                        f"dataset_info.json, no dataset_dict.json): give a prompts file, or a folder written "
                        f"by Dataset.save_to_disk")
    try:
        import datasets
    except ImportError:
        raise UserError(f"{what}: {path} is a Hugging Face datasets folder, which needs the datasets "
                        f"package: {EXTRA}") from None
    where = f"datasets folder {path}"
    empty = [f"{where} split {s.name!r}" if is_dict else where
             for s in (sorted(path.iterdir()) if is_dict else [path]) if _saved_empty(s)]
    try:
        ds = datasets.load_from_disk(str(path))  # local files only: no download, no remote code
    except Exception as e:
        if empty:  # datasets cannot load the empty datasets it saves
            raise UserError(f"{what} {empty[0]} has no rows: give at least one prompt") from None
        raise UserError(f"{what}: {where} could not be read ({_brief(e)}): "
                        f"write it again with Dataset.save_to_disk") from None
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds)
        if "train" in ds:
            split = "train"
        elif len(splits) == 1:
            split = splits[0]
        else:
            raise UserError(f"{what}: {where} is a DatasetDict without a 'train' split (its splits: "
                            f"{_names(splits)}): point at one split's folder, e.g. {path / splits[0]}")
        ds, where = ds[split], f"{where} split {split!r}"
    if column not in ds.column_names:
        raise _no_column(what, where, column, ds.column_names)
    try:
        values = ds.select_columns([column]).to_dict()[column]
    except Exception as e:
        raise UserError(f"{what}: {where} could not be read ({_brief(e)}): "
                        f"write it again with Dataset.save_to_disk") from None
    return _from_column(values, what, where, column)


def _saved_empty(folder: Path) -> bool:
    """Whether ``folder`` holds a dataset that ``save_to_disk`` wrote with no rows (no data files)."""
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and state.get("_data_files") == []
