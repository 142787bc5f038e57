"""Read a table of labelled texts from csv, tsv, jsonl or parquet with a column mapping."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from tuneloop.errors import TuneloopError, first_line

FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


def detect_format(path: Path, declared: str = "auto") -> str:
    if declared != "auto":
        return declared
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise TuneloopError(
            f"{path}: cannot tell the format from the extension '{path.suffix}'; "
            f"set data.format to one of csv, tsv, jsonl, parquet"
        )
    return fmt


def _first_bad_utf8_line(path: Path) -> tuple[int, int]:
    raw = path.read_bytes()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        return line, exc.start
    return 0, 0


def read_table(path: Path, fmt: str = "auto") -> pd.DataFrame:
    """Read the whole file as strings; problems become a TuneloopError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise TuneloopError(f"data file not found: {path} (set data.path to an existing file)")
    if path.stat().st_size == 0:
        raise TuneloopError(f"data file {path} is empty; it needs a header row and labelled texts")
    fmt = detect_format(path, fmt)
    try:
        if fmt == "csv":
            frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
        elif fmt == "tsv":
            # quoting=3 (none): sentiment corpora like SST-2 contain bare quote characters.
            frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, encoding="utf-8", quoting=3)
        elif fmt == "jsonl":
            frame = pd.read_json(path, lines=True, dtype=False, encoding="utf-8")
        else:
            frame = pd.read_parquet(path)
    except UnicodeDecodeError:
        line, offset = _first_bad_utf8_line(path)
        raise TuneloopError(
            f"{path} is not valid UTF-8 (first bad byte at offset {offset}, line {line}); "
            f"re-save it as UTF-8, e.g. iconv -f GBK -t UTF-8"
        ) from None
    except pd.errors.EmptyDataError:
        raise TuneloopError(f"data file {path} is empty; it needs a header row and labelled texts") from None
    except (pd.errors.ParserError, ValueError, OSError) as exc:
        raise TuneloopError(f"cannot read {path} as {fmt}: {first_line(exc)}") from None
    if frame.empty:
        raise TuneloopError(f"data file {path} has a header but no rows")
    return frame


def select_columns(
    frame: pd.DataFrame, path: Path, text_column: str, label_column: str, split_column: str | None = None
) -> pd.DataFrame:
    """Map the user's column names onto text/label(/split), keeping the source row number for messages."""
    wanted = {"text": text_column, "label": label_column}
    if split_column:
        wanted["split"] = split_column
    missing = [f"{role} column '{name}'" for role, name in wanted.items() if name not in frame.columns]
    if missing:
        available = ", ".join(map(str, frame.columns))
        raise TuneloopError(
            f"{path}: no {' or '.join(missing)}; columns are: {available}. "
            f"Set data.text_column / data.label_column to the right names"
        )
    selected = pd.DataFrame({role: frame[name] for role, name in wanted.items()})
    selected = selected.astype(str).where(frame[list(wanted.values())].notna().values, "")
    # +2: one for the header line, one because people count rows from 1.
    selected.insert(0, "row", range(2, len(selected) + 2))
    return selected.reset_index(drop=True)
