"""Import candidate sets from a file into a label column (`coreg-annotate import`).

    coreg-annotate import --config configs/demo.yaml label_import.path=labels.jsonl \
        label_import.column=mine                          # rows {"key": ..., "candidates": [...]}
    coreg-annotate import label_import.path=sets.csv label_import.match=path \
        label_import.key_column=file label_import.labels_column=labels   # "cat/001.jpg","cat|dog"
    coreg-annotate import label_import.path=sets.parquet label_import.votes_column=votes
    coreg-annotate status --labeler import                # done / pending / stale shards
    coreg-train --config configs/demo.yaml train.column=mine

The file (JSONL, CSV/TSV or parquet; the format from the extension or label_import.format) has
one row per sample: the sample's identifier and its candidate set, optionally each annotator's
vote. What the identifier is (label_import.match):

    key        the sample's __key__ in the shards (fmnist_train_000012, cat_001_3f2a9c0d1e2b4a5c, ...)
    path       the source path the ingest kept in the image sample's json (folder ingest: the
               path relative to data.source_path); compared after normalising ./, // and \\
    url        the json's "url" (img2dataset sources)
    json.F     any other field F of the image sample's json (json.key: a WebDataset ingest's
               original key)

label_import.strip_prefix is removed from the file's identifiers first (absolute paths).
Candidates are a JSON list in JSONL and parquet (class names or indices), a separator-joined
string in CSV ("Coat|Shirt", label_import.list_separator; a cell that starts with "[" is read as
JSON). label_import.labels_as=auto reads integers as class indices and strings as class names (a
digit string that is no class name is an index); names | indices force one reading. Votes
(label_import.votes_column): one class per annotator, same notation, stored as votes.npy int16
(d,) with d the most votes any row has and -1 where a row has fewer (an annotator who did not
vote, as a VLM's abstention); for a file with votes only, name the votes column as
labels_column too: the set is their union.

Behaviour (a user's file is checked whole before anything is written):
  * a row whose identifier matches no image sample of the imported splits is *unmatched*:
    counted and the first few listed (counted exactly when one run labels every shard of the
    splits; an array task or a partial rerun only sees its own shards and says so);
  * two rows for one identifier stop the import naming both lines, unless
    label_import.duplicates=union (their sets and votes are joined);
  * an unknown class name, an index outside [0, C) or an empty set stops the import naming the
    file, the line (or parquet row) and the value, with every bad row counted; with
    label_import.on_bad_row=error_record those samples get an error record instead (counted);
  * a sample without a row gets an error record ("no imported candidate set"), counted;
    training skips error records (missing_label).
Each shard's marker counts its samples in `labeler_stats` (matched, no_row, bad_row,
no_identifier); the command prints this run's counts and writes them, with the column's per-split
sums, to RUN/import_stats.json.
The file's sha256 and every option that changes what is written enter each shard's content
hash: a changed file makes the column stale (refused; annotator.overwrite=true relabels it).
The file's path is recorded, not hashed (a moved copy gives the same column).

Memory and time: the file is loaded into a dict identifier -> (line, candidate indices, votes):
about 225 bytes per row with 20-character identifiers and two candidates, read at about 100,000
rows/s (measured on a 300,000-row JSONL file, 2 busy CPU cores): 10 million rows take about
2.5 GB and two minutes. For much more than tens of millions of rows, split the file (by split or
shard range) and import each part into its own column.
"""
from __future__ import annotations

import csv
from array import array
import difflib
import hashlib
import json
import os
import posixpath
import re
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from coreg_dist.config import ConfigError
from coreg_dist.shards.format import FormatError, Manifest, image_shard_path
from coreg_dist.shards.reader import ErrorLog, decode_field, iter_tar

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "csv",
           ".parquet": "parquet", ".pq": "parquet"}
NO_ROW = "no imported candidate set for this sample"
_INT = re.compile(r"^[+-]?\d+$")
_LIST_SHOWN = 5            # bad / duplicate / unmatched rows named in a message


class ImportFileError(FormatError):
    """The import file cannot be used as it is; the message names the file and the rows."""


@dataclass(slots=True)      # millions of rows: no per-row __dict__
class _Row:
    pos: int                          # line number (JSONL, CSV) or 1-based row (parquet)
    cand: Optional[bytes]             # sorted int16 class indices; None: a bad row (error record)
    votes: Optional[bytes] = None     # int16, one per annotator
    error: str = ""                   # why the row is bad (on_bad_row=error_record)


@dataclass
class ImportTable:
    """The import file in memory: identifier -> row, plus what parsing found."""
    path: str
    unit: str                         # "line" or "row": how positions are named
    rows: Dict[str, _Row] = field(default_factory=dict)
    n_rows: int = 0
    bad_rows: int = 0                 # kept as error records (on_bad_row=error_record)
    rows_without_id: int = 0          # skipped (on_bad_row=error_record)
    duplicates_joined: int = 0        # duplicates=union
    bad_examples: List[str] = field(default_factory=list)   # the first few bad rows, named
    has_votes: bool = False
    max_votes: int = 0                # d of votes.npy: the most votes of any row (others: -1)
    used: bytearray = field(default_factory=bytearray)    # by position: matched a sample

    def where(self, pos: int) -> str:
        return f"{self.path} {self.unit} {pos}"


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_format(path: str, declared: str = "auto") -> str:
    if declared != "auto":
        if declared not in ("jsonl", "csv", "parquet"):
            raise ConfigError(f"config key 'label_import.format' is {declared!r}: auto | jsonl | "
                              "csv | parquet")
        return declared
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise ConfigError(f"cannot tell the format of {path} from its extension ({ext or 'none'}; "
                          f"known: {', '.join(FORMATS)}); set label_import.format=jsonl|csv|parquet")
    return FORMATS[ext]


def normalise_path(p: str) -> str:
    """Paths as a folder ingest records them: '/' separators, no './', no doubled '/'."""
    p = p.strip().replace("\\", "/")
    return posixpath.normpath(p) if p else p


# ---------------------------------------------------------------------- reading rows
def _iter_jsonl(path: str) -> Iterator[Tuple[int, Dict]]:
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except ValueError as exc:
                raise ImportFileError(f"{path} line {line_no}: not valid JSON ({exc})") from None
            if not isinstance(obj, dict):
                raise ImportFileError(f"{path} line {line_no}: a JSON object per line is expected, "
                                      f"got {type(obj).__name__}")
            yield line_no, obj


def _iter_csv(path: str, delimiter: str, needed: Sequence[str]) -> Iterator[Tuple[int, Dict]]:
    with open(path, "r", encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        header = reader.fieldnames or []
        missing = [c for c in needed if c not in header]
        if missing:
            raise ImportFileError(f"{path}: no column {missing[0]!r} in the header {header} "
                                  "(label_import.key_column / labels_column / votes_column; "
                                  f"delimiter {delimiter!r})")
        for row in reader:
            yield reader.line_num, row


def _iter_parquet(path: str, needed: Sequence[str]) -> Iterator[Tuple[int, Dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportFileError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    missing = [c for c in needed if c not in names]
    if missing:
        raise ImportFileError(f"{path}: no column {missing[0]!r} (the file has {names}; "
                              "label_import.key_column / labels_column / votes_column)")
    row = 0
    for batch in pf.iter_batches(batch_size=65536, columns=list(dict.fromkeys(needed))):
        cols = {c: batch.column(c).to_pylist() for c in dict.fromkeys(needed)}
        for i in range(batch.num_rows):
            row += 1
            yield row, {c: v[i] for c, v in cols.items()}


# ---------------------------------------------------------------------- class values
class _Classes:
    def __init__(self, names: Sequence[str], labels_as: str, separator: str):
        self.names, self.index = list(names), {n: i for i, n in enumerate(names)}
        self.labels_as, self.separator = labels_as, separator

    def tokens(self, value) -> list:
        if value is None:
            return []
        if isinstance(value, (list, tuple)):
            return list(value)
        if isinstance(value, str):
            s = value.strip()
            if s.startswith("["):
                try:
                    parsed = json.loads(s)
                except ValueError as exc:
                    raise ValueError(f"cell {value!r} starts with '[' but is not a JSON list ({exc})") from None
                if isinstance(parsed, list):
                    return parsed
            return [t.strip() for t in s.split(self.separator) if t.strip()] if self.separator else [s]
        return [value]                 # a single index (JSON int)

    def one(self, tok) -> int:
        n = len(self.names)
        if isinstance(tok, bool):
            raise ValueError(f"{tok!r} is not a class name or index")
        if isinstance(tok, float) and tok.is_integer():
            tok = int(tok)
        if isinstance(tok, int):
            if self.labels_as == "names":
                return self._name(str(tok))
            idx = tok
        elif isinstance(tok, str):
            if self.labels_as != "indices" and tok in self.index:
                return self.index[tok]
            if self.labels_as == "names" or not _INT.match(tok.strip()):
                return self._name(tok)
            idx = int(tok)
        else:
            raise ValueError(f"{tok!r} is not a class name or index")
        if not 0 <= idx < n:
            raise ValueError(f"class index {idx} out of range [0, {n})")
        return idx

    def _name(self, tok: str) -> int:
        if tok in self.index:
            return self.index[tok]
        close = difflib.get_close_matches(tok, self.names, n=1)
        shown = ", ".join(repr(c) for c in self.names[:12]) + (", ..." if len(self.names) > 12 else "")
        raise ValueError(f"unknown class {tok!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                         + f"; the dataset's classes: {shown}")

    def indices(self, value, what: str) -> List[int]:
        toks = self.tokens(value)
        if not toks:
            raise ValueError(f"empty {what} ({value!r})")
        return [self.one(t) for t in toks]


# ---------------------------------------------------------------------- loading the table
def load_table(path: str, cfg, classes: Sequence[str]) -> ImportTable:
    """Read and check the whole file. Problems in rows (unknown class, bad index, empty set, no
    identifier) stop here with every bad row counted and the first few named, unless
    on_bad_row=error_record; duplicates stop here unless duplicates=union."""
    cfg = _plain(cfg)
    fmt = file_format(path, cfg.format)
    key_col = key_column(cfg)
    needed = [key_col] + [c for c in (cfg.labels_column, cfg.votes_column) if c]
    if fmt == "jsonl":
        rows = _iter_jsonl(path)
    elif fmt == "csv":
        delim = cfg.csv_delimiter or ("\t" if path.lower().endswith(".tsv") else ",")
        rows = _iter_csv(path, delim, needed)
    else:
        rows = _iter_parquet(path, needed)
    cls = _Classes(classes, cfg.labels_as, cfg.list_separator)
    table = ImportTable(path, "row" if fmt == "parquet" else "line", has_votes=bool(cfg.votes_column))
    bad: List[str] = []
    dups: Dict[str, List[int]] = {}
    last_pos = 0
    keep_bad = cfg.on_bad_row == "error_record"
    for pos, obj in rows:
        table.n_rows += 1
        last_pos = max(last_pos, pos)
        where = table.where(pos)
        missing = [c for c in needed if c not in obj]
        if missing:            # JSONL rows need not share keys; CSV and parquet checked the header
            raise ImportFileError(f"{where}: no field {missing[0]!r} (has {sorted(obj)}); set "
                                  "label_import.key_column / labels_column / votes_column")
        ident = obj[key_col]
        ident = "" if ident is None else str(ident)
        if cfg.strip_prefix and ident.startswith(cfg.strip_prefix):
            ident = ident[len(cfg.strip_prefix):]
        if cfg.match == "path":
            ident = normalise_path(ident)
        ident = ident.strip()
        row = _Row(pos, None)
        try:
            if not ident:
                raise ValueError(f"empty identifier in column {key_col!r}")
            votes = cls.indices(obj[cfg.votes_column], f"votes in column {cfg.votes_column!r}") \
                if cfg.votes_column else None
            cand = cls.indices(obj[cfg.labels_column], f"candidate set in column "
                                                       f"{cfg.labels_column!r}")
            # int16 bytes: compact, and array() is far cheaper per row than numpy
            row.cand = array("h", sorted(set(cand))).tobytes()
            row.votes = None if votes is None else array("h", votes).tobytes()
        except ValueError as exc:
            if ident:
                table.bad_rows += 1
            else:
                table.rows_without_id += 1
            if len(bad) < _LIST_SHOWN:
                bad.append(f"{where}: {exc}")
            if not keep_bad or not ident:     # a row without an identifier fits no sample
                continue
            # the bytes of err.txt: the position, not the file's path (which is not hashed)
            row.error = f"{table.unit} {pos} of the import file: {exc}"
        prev = table.rows.get(ident)
        if prev is None:
            table.rows[ident] = row
            continue
        if cfg.duplicates != "union":
            dups.setdefault(ident, [prev.pos]).append(pos)
            continue
        table.duplicates_joined += 1
        if prev.error or row.error:
            prev.error = prev.error or row.error
            prev.cand = None
        else:
            prev.cand = np.union1d(np.frombuffer(prev.cand, np.int16),
                                   np.frombuffer(row.cand, np.int16)).astype(np.int16).tobytes()
            if prev.votes is not None:
                prev.votes += row.votes
    n_bad = table.bad_rows + table.rows_without_id
    if n_bad and not keep_bad:
        raise ImportFileError(f"{n_bad} bad row(s) in {path} (nothing written): " + "; ".join(bad)
                              + (" ..." if n_bad > len(bad) else "")
                              + ". Fix them, or label_import.on_bad_row=error_record to give those "
                              "samples an error record")
    if dups:
        shown = [f"{k!r} at {table.unit}s {', '.join(map(str, p))}"
                 for k, p in list(dups.items())[:_LIST_SHOWN]]
        raise ImportFileError(f"{path}: {len(dups)} identifier(s) with more than one row (nothing "
                              f"written): " + "; ".join(shown) + (" ..." if len(dups) > _LIST_SHOWN else "")
                              + ". Remove them, or label_import.duplicates=union to join their sets")
    table.bad_examples = bad
    if not table.rows:
        raise ImportFileError(f"{path}: no usable row (read {table.n_rows})"
                              + (f"; first bad: {bad[0]}" if bad else ""))
    table.used = bytearray(last_pos + 1)
    if table.has_votes:
        table.max_votes = max((len(r.votes) // 2 for r in table.rows.values() if r.votes), default=0)
    return table


def _plain(cfg):
    """The options as plain attributes: reading an omegaconf node costs tens of microseconds,
    which per row would dominate a file of millions of rows."""
    from omegaconf import DictConfig, OmegaConf

    return SimpleNamespace(**OmegaConf.to_container(cfg)) if isinstance(cfg, DictConfig) else cfg


def key_column(cfg) -> str:
    """The file's identifier column: label_import.key_column, else the match's own name."""
    if cfg.key_column:
        return cfg.key_column
    return cfg.match[len("json."):] if cfg.match.startswith("json.") else cfg.match


def _json_field(match: str) -> Optional[str]:
    """The image sample's json field matched on (None: the sample's __key__)."""
    if match == "key":
        return None
    return match[len("json."):] if match.startswith("json.") else match


# ---------------------------------------------------------------------- the labeler
class ImportLabeler:
    """Writes the imported sets (annotate/columns.py write_column does the rest)."""
    needs_images = False

    def __init__(self, cfg, classes: Sequence[str]):
        cfg = _plain(cfg)
        if not cfg.path:
            raise ConfigError("config key 'label_import.path' is required: the file to import")
        checks = {"match": None, "labels_as": ("auto", "names", "indices"),
                  "duplicates": ("error", "union"), "on_bad_row": ("error", "error_record")}
        for k, allowed in checks.items():
            v = getattr(cfg, k)
            if allowed and v not in allowed:
                raise ConfigError(f"config key 'label_import.{k}' is {v!r}: one of {' | '.join(allowed)}")
        if cfg.match not in ("key", "path", "url") and not (cfg.match.startswith("json.")
                                                           and len(cfg.match) > 5):
            raise ConfigError(f"config key 'label_import.match' is {cfg.match!r}: key | path | url "
                              "| json.FIELD")
        if not cfg.labels_column:
            raise ConfigError("config key 'label_import.labels_column' is empty: name the file's "
                              "candidate-set column (a file with votes only: its votes column)")
        if not os.path.isfile(cfg.path):
            raise ImportFileError(f"import file not found: {cfg.path} (label_import.path)")
        self.cfg, self.classes = cfg, list(classes)
        self.format = file_format(cfg.path, cfg.format)
        self.field = _json_field(cfg.match)
        self.needs_meta = self.field is not None
        self.sha256 = file_sha256(cfg.path)
        self.bytes = os.path.getsize(cfg.path)
        self.table: Optional[ImportTable] = None
        self.counts = {"samples": 0, "matched": 0, "no_row": 0, "no_identifier": 0, "bad_row": 0}

    def load(self) -> ImportTable:
        """Parse and check the whole file (call before writing: errors stop with nothing written)."""
        t0 = time.time()
        before = os.stat(self.cfg.path)
        self.table = load_table(self.cfg.path, self.cfg, self.classes)
        after = os.stat(self.cfg.path)
        if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns) or \
                file_sha256(self.cfg.path) != self.sha256:
            raise ImportFileError(f"{self.cfg.path} changed while it was read; run the import again")
        t = self.table
        print(f"read {t.n_rows} rows ({len(t.rows)} identifiers) from {self.cfg.path} in "
              f"{time.time() - t0:.1f}s" + (f"; {t.bad_rows} bad rows kept as error records"
                                            if t.bad_rows else "")
              + (f"; {t.rows_without_id} rows without an identifier skipped" if t.rows_without_id else "")
              + (f"; {t.duplicates_joined} duplicate rows joined" if t.duplicates_joined else "")
              + (f"; first bad: {'; '.join(t.bad_examples)}" if t.bad_examples else ""),
              flush=True)
        return t

    def _ident(self, key: str, meta) -> str:
        if self.field is None:
            return key
        v = meta.get(self.field) if isinstance(meta, dict) else None
        if v is None:
            return ""
        v = str(v)
        return (normalise_path(v) if self.cfg.match == "path" else v).strip()

    def label(self, images, true: np.ndarray, keys: List[str], metas=None, **_) -> Dict:
        if self.table is None:
            self.load()
        t, C = self.table, len(self.classes)
        B = len(keys)
        Y = np.zeros((B, C), dtype=bool)
        votes = np.full((B, t.max_votes), -1, dtype=np.int16)
        errors = [""] * B
        before = dict(self.counts)
        for i, key in enumerate(keys):
            self.counts["samples"] += 1
            ident = self._ident(key, metas[i] if metas is not None else None)
            row = t.rows.get(ident) if ident else None
            if row is None:
                if ident:
                    self.counts["no_row"] += 1
                    errors[i] = NO_ROW
                else:
                    self.counts["no_identifier"] += 1
                    errors[i] = (f"no json field {self.field!r} to match on "
                                 f"(label_import.match={self.cfg.match})")
                continue
            t.used[row.pos] = 1
            if row.cand is None:
                self.counts["bad_row"] += 1
                errors[i] = row.error
                continue
            self.counts["matched"] += 1
            Y[i, np.frombuffer(row.cand, np.int16)] = True
            if t.has_votes:
                v = np.frombuffer(row.votes, np.int16)
                votes[i, :len(v)] = v
        # per-shard counts in the marker (labeler_stats): why samples got error records
        out = {"Y": Y, "errors": errors,
               "stats": {k: self.counts[k] - before[k] for k in self.counts if k != "samples"}}
        if t.has_votes:
            out["votes"] = votes
        return out

    def provenance(self) -> Dict:
        return {"annotator": "import", "path": os.path.abspath(self.cfg.path),
                **self.content_provenance()}

    def content_provenance(self) -> Dict:
        """What determines the column's bytes: the file's content and how it is read (not its
        path: a moved copy gives the same column)."""
        c = self.cfg
        p = {"annotator": "import", "file_sha256": self.sha256, "file_bytes": self.bytes,
             "format": self.format, "match": c.match, "key_column": key_column(c),
             "labels_column": c.labels_column, "votes_column": c.votes_column,
             "labels_as": c.labels_as, "strip_prefix": c.strip_prefix,
             "duplicates": c.duplicates, "on_bad_row": c.on_bad_row}
        if self.format == "csv":
            p["csv_delimiter"] = c.csv_delimiter or ("\t" if c.path.lower().endswith(".tsv") else ",")
        p["list_separator"] = c.list_separator     # splits string cells in JSONL too
        return p

    def summary(self, samples_in_scope: int) -> Dict:
        """Counts of this run. Unmatched rows are exact only when this run met every sample of the
        imported splits (one task, every shard labeled)."""
        t = self.table
        out = dict(self.counts)
        out.update({"rows": t.n_rows if t else 0, "bad_rows_in_file": t.bad_rows if t else 0,
                    "rows_without_identifier": t.rows_without_id if t else 0,
                    "duplicate_rows_joined": t.duplicates_joined if t else 0,
                    "samples_in_scope": samples_in_scope})
        if t is None or self.counts["samples"] < samples_in_scope:
            out["unmatched_rows"] = None
            return out
        unmatched_ids = sorted(((r.pos, k) for k, r in t.rows.items() if not t.used[r.pos]))
        out["unmatched_rows"] = len(unmatched_ids)
        out["unmatched_examples"] = [f"{t.unit} {p}: {k}" for p, k in unmatched_ids[:_LIST_SHOWN]]
        return out


# ---------------------------------------------------------------------- the command
def check_match_field(root: str, manifest: Manifest, splits: Sequence[str], labeler: ImportLabeler) -> None:
    """Matching on a json field that the image samples do not have would give every sample an
    error record: look at the first sample first and stop with what its json holds."""
    if labeler.field is None:
        return
    for split in splits:
        for e in manifest.shards(split):
            for key, fields in iter_tar(image_shard_path(root, e.name)):
                meta = decode_field("json", fields["json"]) if "json" in fields else None
                if not isinstance(meta, dict) or labeler.field not in meta:
                    has = sorted(meta) if isinstance(meta, dict) else "no json member"
                    raise FormatError(
                        f"label_import.match={labeler.cfg.match}: image sample {key} of shard "
                        f"{image_shard_path(root, e.name)} has no json field {labeler.field!r} "
                        f"(its json: {has}); match on key or on a field the ingest kept")
                return


def import_column(cfg, task_index: int = 0, num_tasks: int = 1) -> Dict:
    """`coreg-annotate import`: the file's sets into label_import.column."""
    from annotate.cli import _annotation_report
    from annotate.columns import requested_splits, write_column
    from annotate.merge import add_labeler_stats
    from coreg_dist.shards.format import read_manifest

    c = cfg.label_import
    manifest = read_manifest(cfg.data.root)
    splits = requested_splits(cfg.data.root, manifest, c.splits, "label_import.splits")
    labeler = ImportLabeler(c, manifest.classes)
    t0 = time.time()
    labeler.load()                      # the whole file checked before anything is written
    check_match_field(cfg.data.root, manifest, splits, labeler)
    errors = ErrorLog()
    stats = write_column(cfg.data.root, manifest, c.column, splits, labeler, batch_size=1024,
                         overwrite=cfg.annotator.overwrite, redo_errors=cfg.annotator.redo_errors,
                         task_index=task_index, num_tasks=num_tasks, errors=errors)
    counts = labeler.summary(sum(manifest.count(s) for s in splits))
    add_labeler_stats(cfg.data.root, manifest, c.column, stats)
    report = _annotation_report(cfg, stats, errors, time.time() - t0, name="import_stats.json",
                                extra={"import": counts, "column": c.column},
                                task=(task_index, num_tasks))
    print_import_counts(counts, c.path)
    return report


def print_import_counts(n: Dict, path: str) -> None:
    if n["samples"] == 0:
        print(f"import from {path}: every shard already done (nothing labeled in this run)")
        return
    print(f"import from {path}: {n['samples']} samples labeled in this run: {n['matched']} with a "
          f"row, {n['no_row']} without a row (error records)"
          + (f", {n['no_identifier']} without the json field matched on" if n["no_identifier"] else "")
          + (f", {n['bad_row']} with a bad row (error records)" if n["bad_row"] else ""))
    if n["unmatched_rows"] is None:
        print(f"unmatched rows: not counted (this run met {n['samples']} of the "
              f"{n['samples_in_scope']} samples of the imported splits: an array task or a partial "
              "rerun; a single run over every shard counts them)")
    elif n["unmatched_rows"]:
        print(f"unmatched rows: {n['unmatched_rows']} of {n['rows']} rows match no image sample; "
              f"first: {'; '.join(n['unmatched_examples'])}")
    else:
        print(f"unmatched rows: 0 (every one of the {n['rows']} rows matched a sample)")


__all__ = ["ImportFileError", "ImportLabeler", "ImportTable", "import_column", "load_table",
           "normalise_path"]
