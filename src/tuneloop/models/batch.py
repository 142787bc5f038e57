"""Batch prediction over files larger than memory: streamed in chunks, written atomically, resumable.

The input (csv, tsv, jsonl, parquet, or txt with one text per line) is read one chunk at a time; each chunk's
predictions are written, atomically, as a part file in `<output>.parts/`, so a run that is interrupted (Ctrl-C,
a kill, a power cut) resumes at the first missing part and never predicts a chunk twice. A manifest pins what
the parts were made from — the input's size and modification time, the model, the text column, the chunk
size — and a resume against anything else starts over instead of mixing two runs. Once every part is there,
they are joined into the output (parquet, csv or jsonl) through a temporary file that replaces it in one step,
and the parts are removed. Memory stays that of one chunk, whatever the file's size.

The output is a copy of users' texts that is often passed on (a spreadsheet, another team): its text column is
masked as privacy.mask says (by default as the version's training data was), after the texts are predicted.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tuneloop.atomic import atomic_file, write_text_atomically
from tuneloop.config import PrivacyConfig
from tuneloop.data.spreadsheet import spreadsheet_safe
from tuneloop.errors import TuneloopError
from tuneloop.models.predictor import Predictor
from tuneloop.privacy.mask import masker

log = logging.getLogger(__name__)

INPUT_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".parquet": "parquet", ".txt": "txt"}
OUTPUT_FORMATS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "jsonl"}
PREDICTED_COLUMNS = ("label", "probability")
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class BatchOutcome:
    rows: int
    chunks: int
    chunks_resumed: int  # chunks an interrupted run had already predicted
    output: Path


def file_format(path: Path, formats: dict[str, str], what: str) -> str:
    found = formats.get(path.suffix.lower())
    if found is None:
        raise TuneloopError(f"{what} {path} must end in one of {', '.join(formats)}")
    return found


def count_rows(path: Path) -> int | None:
    """The rows of an input file, cheaply (for progress and ETA): parquet's metadata, or the file's line count
    (less a csv header; a quoted newline inside a csv field makes it an estimate)."""
    kind = file_format(path, INPUT_FORMATS, "input")
    if kind == "parquet":
        return int(pq.ParquetFile(path).metadata.num_rows)
    lines, last = 0, b"\n"
    with path.open("rb") as handle:
        while block := handle.read(1 << 20):
            lines += block.count(b"\n")
            last = block[-1:]
    lines += last != b"\n"  # a last line without its newline
    return max(lines - (kind in ("csv", "tsv")), 0)


def read_chunks(path: Path, text_column: str, chunk_rows: int) -> Iterator[pd.DataFrame]:
    """The input in chunks of `chunk_rows` rows, each with `text_column` (a txt file's lines become "text")."""
    kind = file_format(path, INPUT_FORMATS, "input")
    if kind == "parquet":
        parquet = pq.ParquetFile(path)
        _require(text_column, parquet.schema_arrow.names, path)
        for batch in parquet.iter_batches(batch_size=chunk_rows):
            yield batch.to_pandas()
    elif kind == "txt":
        with path.open(encoding="utf-8") as handle:
            lines: list[str] = []
            for line in handle:
                lines.append(line.rstrip("\r\n"))
                if len(lines) == chunk_rows:
                    yield pd.DataFrame({"text": lines})
                    lines = []
            if lines:
                yield pd.DataFrame({"text": lines})
    else:
        reader = (
            pd.read_json(path, lines=True, chunksize=chunk_rows, dtype=False)
            if kind == "jsonl"
            else pd.read_csv(
                path, sep="\t" if kind == "tsv" else ",", chunksize=chunk_rows, dtype=str, keep_default_na=False
            )
        )
        with reader as chunks:
            for chunk in chunks:
                _require(text_column, list(chunk.columns), path)
                yield chunk.reset_index(drop=True)


def _require(column: str, columns: list[str], path: Path) -> None:
    if column not in columns:
        raise TuneloopError(
            f"{path} has no '{column}' column (it has {', '.join(map(str, columns)) or 'none'}); "
            "name the text column with --text-column"
        )


def predicted_chunk(predictor: Predictor, chunk: pd.DataFrame, text_column: str) -> pd.DataFrame:
    """The chunk with each text's label and probability; a missing or blank text gets none."""
    texts = chunk[text_column].map(lambda t: t if isinstance(t, str) else "").tolist()
    present = [i for i, text in enumerate(texts) if text.strip()]
    labels = np.full(len(texts), None, dtype=object)
    probability = np.full(len(texts), np.nan)
    if present:
        probs = predictor.predict_proba([texts[i] for i in present])
        labels[present] = np.array(predictor.labels, dtype=object)[probs.argmax(1)]
        probability[present] = probs.max(1)
    clashing = [c for c in PREDICTED_COLUMNS if c in chunk.columns]
    out = chunk.rename(columns={c: f"input_{c}" for c in clashing})
    return out.assign(label=labels, probability=probability)


def trained_privacy(predictor: Predictor) -> PrivacyConfig:
    """The privacy section the version was trained with (its stored recipe); the defaults for a folder's model."""
    stored = predictor.record.config if predictor.record is not None else {}
    return PrivacyConfig.model_validate(stored.get("privacy") or {})


def masked_chunk(chunk: pd.DataFrame, text_column: str, privacy: PrivacyConfig) -> pd.DataFrame:
    mask = masker(privacy)
    if mask is None:
        return chunk
    return chunk.assign(**{text_column: chunk[text_column].map(lambda t: mask(t) if isinstance(t, str) else t)})


def manifest_of(
    input_path: Path, predictor: Predictor, text_column: str, chunk_rows: int, privacy: PrivacyConfig
) -> dict[str, object]:
    stat = input_path.stat()
    return {
        "input": str(input_path.resolve()),
        "size": stat.st_size,
        "modified_ns": stat.st_mtime_ns,
        "model": predictor.ref,
        "runtime": predictor.runtime,
        "text_column": text_column,
        "chunk_rows": chunk_rows,
        "privacy": privacy.model_dump(mode="json", include={"mask", "phone_regions"}),
    }


def predict_file(
    predictor: Predictor,
    input_path: Path,
    output: Path,
    text_column: str = "text",
    chunk_rows: int = 10_000,
    on_rows: Callable[[int], None] | None = None,
    privacy: PrivacyConfig | None = None,
) -> BatchOutcome:
    """Predict every row of `input_path` into `output`, resuming an interrupted run of the same job; the text
    column is written masked as `privacy` says (None: as the version's training data was)."""
    if chunk_rows < 1:
        raise TuneloopError("--chunk-rows must be at least 1")
    if not input_path.is_file():
        raise TuneloopError(f"input file not found: {input_path}")
    if file_format(input_path, INPUT_FORMATS, "input") == "txt":
        text_column = "text"  # a txt file's lines
    output_kind = file_format(output, OUTPUT_FORMATS, "output")
    parts = output.with_name(output.name + ".parts")
    privacy = privacy or trained_privacy(predictor)
    manifest = manifest_of(input_path, predictor, text_column, chunk_rows, privacy)
    if parts.exists() and _read_manifest(parts) != manifest:
        log.warning("%s holds parts of another job (input, model or chunking changed): starting over", parts)
        shutil.rmtree(parts)
    parts.mkdir(parents=True, exist_ok=True)
    write_text_atomically(parts / MANIFEST, json.dumps(manifest, indent=2))

    rows = chunks = resumed = 0
    try:
        for index, chunk in enumerate(read_chunks(input_path, text_column, chunk_rows)):
            part = parts / f"part-{index:06d}.parquet"
            if _readable(part):
                resumed += 1
            else:
                with atomic_file(part) as temporary:
                    predicted = predicted_chunk(predictor, chunk, text_column)
                    masked_chunk(predicted, text_column, privacy).to_parquet(temporary, index=False)
            rows += len(chunk)
            chunks += 1
            if on_rows is not None:
                on_rows(len(chunk))
    except UnicodeDecodeError:
        raise TuneloopError(f"{input_path} is not valid UTF-8; re-save it as UTF-8") from None
    except (ValueError, pa.ArrowException) as exc:
        raise TuneloopError(f"cannot read {input_path}: {str(exc).splitlines()[0]}") from None
    _join(sorted(parts.glob("part-*.parquet"))[:chunks], output, output_kind)
    shutil.rmtree(parts)
    return BatchOutcome(rows=rows, chunks=chunks, chunks_resumed=resumed, output=output)


def _readable(part: Path) -> bool:
    """A part an earlier run finished: present and whole (a power cut can leave a renamed file empty)."""
    try:
        pq.read_metadata(part)
    except (OSError, pa.ArrowException):
        return False
    return True


def _read_manifest(parts: Path) -> dict[str, object] | None:
    try:
        found = json.loads((parts / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def _join(parts: list[Path], output: Path, kind: str) -> None:
    """The parts, in order, into `output`, one part in memory at a time; the output appears whole or not at all."""
    with atomic_file(output) as temporary:
        if kind == "parquet":
            writer: pq.ParquetWriter | None = None
            try:
                for part in parts:
                    table = pq.read_table(part)
                    if writer is None:
                        writer = pq.ParquetWriter(temporary, table.schema)
                    # pyarrow-stubs types the writer's schema as a ParquetSchema; ParquetWriter keeps the Arrow schema
                    # it was given.
                    writer.write_table(table.cast(cast(pa.Schema, writer.schema)))
            finally:
                if writer is not None:
                    writer.close()
            if writer is None:  # an empty input: an empty file with the predicted columns
                pd.DataFrame(columns=list(PREDICTED_COLUMNS)).to_parquet(temporary, index=False)
            return
        with temporary.open("w", encoding="utf-8", newline="") as out:
            for number, part in enumerate(parts):
                frame = pd.read_parquet(part)
                if kind == "csv":  # for a spreadsheet: texts must not run as formulas there
                    frame.map(spreadsheet_safe).to_csv(out, index=False, header=number == 0)
                else:
                    frame.to_json(out, orient="records", lines=True, force_ascii=False)
                    out.write("" if frame.empty else "\n")
