"""The result store: one append-only, fsynced record log (+ structures) behind every resumable job.

``geodite-sim relax``, the screening workflow and SSE campaigns keep their results here (see
``docs/store.md``). A store is a directory holding three files (names chosen per job):

- ``store.json``: the header, written once: ``fingerprint`` (hash of the settings and the model),
  ``settings`` (the settings themselves, to say what changed) and ``model_fingerprint``;
- ``<records>.jsonl``: one JSON object per line, one line per finished input, appended with
  ``flush`` + ``os.fsync``; every line carries ``kind`` (the input stream: ``"relax"``,
  ``"candidate"``, ``"reference"``, ``"run"``) and ``index`` (the input's position in that stream);
- ``<structures>.extxyz`` (optional): structures, appended (and fsynced) *before* their record;
  the record holds ``_xyz = [byte offset, byte length]`` of its frame.

Records are keyed by ``(kind, index)``, the input position: the same file given three times is
three records. Resume = skip the keys already stored; a job whose inputs are all stored writes
nothing (a re-run of a finished job is a no-op). Opening a store for writing with another
fingerprint raises :class:`StoreMismatch` naming what differs. After a kill the last line may be
cut: the writer truncates it (and any structure written after the last complete record) when it
opens; readers (:func:`read_records`, :meth:`ResultStore.open_readonly`) ignore it, so a store can
be read while a job writes it. Records are typed: a dataclass given as ``record_type``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np

try:  # POSIX advisory lock: one writer per store
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

HEADER = "store.json"
FORMAT_VERSION = 1
#: Keys the store adds to every line (not fields of the record type).
_STORE_KEYS = ("kind", "index", "_xyz", "_type")



def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically: a temporary file in the same folder, fsynced, then renamed over it
    (a reader or a killed job sees the old or the new content, never a mix)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def json_default(o: Any) -> Any:
    """JSON for the values results carry: paths as strings, numpy scalars and arrays as numbers and lists."""
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_json(path: str | os.PathLike, data: Any, *, sort_keys: bool = False,
               default: Callable[[Any], Any] = json_default) -> None:
    """``data`` as indented JSON, written atomically (:func:`write_atomic`)."""
    write_atomic(path, json.dumps(data, indent=1, sort_keys=sort_keys, default=default))


class StoreError(RuntimeError):
    """The store cannot be used as asked."""


class StoreMismatch(StoreError):
    """The store holds results made with another model or other settings."""


class StoreLocked(StoreError):
    """Another process is writing to the store."""


# ---------------------------------------------------------------------------------------------- fingerprints
def model_fingerprint(model: Any) -> str:
    """One identity of a model for every resume check.

    Uses :func:`geodite_sim.model.contract.model_fingerprint` when the model contract module provides it;
    otherwise (fallback) a SHA-256 over the state_dict's names, dtypes, shapes and bytes, plus the class name
    (a parameter-free model such as ``MorsePotential`` is identified by its ``name`` / constructor values).
    """
    try:
        from geodite_sim.model.contract import model_fingerprint as contract_fingerprint
    except ImportError:
        contract_fingerprint = None  # type: ignore[assignment]
    if contract_fingerprint is not None:
        return str(contract_fingerprint(model))
    h = hashlib.sha256(type(model).__qualname__.encode())
    h.update(str(getattr(model, "name", "")).encode())
    identity = getattr(model, "identity_config", None)  # parameter-free models (MorsePotential) say who they are
    if callable(identity):
        h.update(json.dumps(_jsonable(identity()), sort_keys=True).encode())
    h.update(str(getattr(model, "dtype", "")).encode())
    state = getattr(model, "state_dict", None)
    if callable(state):
        import torch

        for key, value in sorted(state().items()):
            if not isinstance(value, torch.Tensor):
                continue
            h.update(key.encode())
            h.update(f"{value.dtype}{tuple(value.shape)}".encode())
            h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _jsonable(x: Any) -> Any:
    """Settings as plain JSON (tuples -> lists, NaN -> None, unknown objects -> repr)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, (str, int, bool)) or x is None:
        return x
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item") and callable(x.item):  # numpy scalars
        try:
            return _jsonable(x.item())
        except (TypeError, ValueError):
            pass
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    return repr(x)


def settings_fingerprint(settings: Mapping[str, Any]) -> str:
    """SHA-256 (16 hex digits) of the settings as sorted JSON."""
    return hashlib.sha256(json.dumps(_jsonable(settings), sort_keys=True).encode()).hexdigest()[:16]


def _diff(old: Mapping, new: Mapping) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


# ---------------------------------------------------------------------------------------------- records
def _record_to_json(record: Any) -> dict:
    if not dataclasses.is_dataclass(record):
        raise TypeError(f"store records are dataclasses, got {type(record).__name__}")
    return {f.name: _jsonable(getattr(record, f.name)) for f in dataclasses.fields(record)}


def _record_from_json(record_type: type, data: Mapping) -> Any:
    names = {f.name for f in dataclasses.fields(record_type)}
    return record_type(**{k: v for k, v in data.items() if k in names})


def _parse_lines(raw: bytes) -> tuple[list[dict], int]:
    """Complete JSON lines of ``raw`` and the byte length they span (a cut or corrupt tail is left out)."""
    out, good = [], 0
    start = 0
    while True:
        end = raw.find(b"\n", start)
        if end < 0:
            break
        line = raw[start:end]
        try:
            obj = json.loads(line) if line.strip() else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            break  # a line cut by a kill and then completed by another writer cannot happen (one writer)
        if obj is not None:
            if not isinstance(obj, dict) or "index" not in obj:
                break
            out.append(obj)
        start = good = end + 1
    return out, good


def read_records(path: str | os.PathLike) -> list[dict]:
    """The complete records of a ``.jsonl`` store file as dicts, without modifying it (safe while a job writes)."""
    path = Path(path)
    if not path.exists():
        return []
    return _parse_lines(path.read_bytes())[0]


@dataclasses.dataclass
class StoreHeader:
    """``store.json``: what produced the records."""

    fingerprint: str
    model_fingerprint: str | None
    settings: dict
    created: str
    version: int = FORMAT_VERSION
    job: str = ""


class ResultStore[R]:
    """Append-only typed records keyed by ``(kind, index)``, with optional structures; see the module doc.

    Args:
        directory: the store's folder (created).
        record_type: the dataclass of the records (must have an ``index: int`` field).
        settings: everything that determines the results (JSON-able); part of the fingerprint.
        model: the model (its :func:`model_fingerprint` joins the fingerprint), or None.
        records_name, structures_name: file names inside ``directory``.
        job: a name written to the header (``"relax"``, ``"screen"``, ...).
        readonly: read what is there (no header check, no repair, no lock); :meth:`put` refuses.
    """

    def __init__(self, directory: str | os.PathLike, record_type: type[R], settings: Mapping[str, Any] | None = None,
                 model: Any = None, *, records_name: str = "records.jsonl",
                 structures_name: str | None = "structures.extxyz", job: str = "", readonly: bool = False):
        self.directory = Path(directory)
        self.record_type = record_type
        self.records_path = self.directory / records_name
        self.structures_path = self.directory / structures_name if structures_name else None
        self.header_path = self.directory / HEADER
        self.readonly = readonly
        self._records: dict[tuple[str, int], R] = {}
        self._xyz: dict[tuple[str, int], tuple[int, int]] = {}
        self._fd: IO[bytes] | None = None
        self._xyz_fd: IO[bytes] | None = None
        self._lock_fd: IO[str] | None = None
        if readonly:
            self.header = self._read_header()
            self._load(repair=False)
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock()
        settings = dict(_jsonable(dict(settings or {})))
        mfp = model_fingerprint(model) if model is not None else None
        fp = settings_fingerprint({"settings": settings, "model": mfp})
        old = self._read_header()
        if old is None:
            self.header = StoreHeader(fp, mfp, settings, time.strftime("%Y-%m-%dT%H:%M:%S"), job=job)
            self._write_header()
        else:
            if old.fingerprint != fp:
                what = []
                if old.model_fingerprint != mfp:
                    what.append(f"model: {old.model_fingerprint} -> {mfp}")
                what += _diff(old.settings, settings)
                self.close()
                raise StoreMismatch(
                    f"{self.directory} holds results made with another model or other settings "
                    f"({'; '.join(what) or 'fingerprint differs'}); resuming would mix them. "
                    "Use another output folder, or delete this one to start over."
                )
            self.header = old
        self._load(repair=True)

    # ------------------------------------------------------------------ opening
    @classmethod
    def open_readonly(cls, directory: str | os.PathLike, record_type: type[R], **names) -> ResultStore[R]:
        """The records there now, for reading (while a job runs, too)."""
        return cls(directory, record_type, readonly=True, **names)

    def _lock(self) -> None:
        if fcntl is None:
            return
        self._lock_fd = open(self.directory / ".store.lock", "a")
        try:
            fcntl.flock(self._lock_fd.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_fd.close()
            self._lock_fd = None
            raise StoreLocked(f"{self.directory}: another process is writing to this store") from None
        except OSError:  # a filesystem without locks: go on without
            pass

    def _read_header(self) -> StoreHeader | None:
        if not self.header_path.exists():
            return None
        data = json.loads(self.header_path.read_text())
        return StoreHeader(**{f.name: data.get(f.name) for f in dataclasses.fields(StoreHeader)
                              if f.name in data})

    def _write_header(self) -> None:
        assert self.header is not None
        write_atomic(self.header_path, json.dumps(dataclasses.asdict(self.header), indent=1))
        _fsync_dir(self.directory)

    def _load(self, repair: bool) -> None:
        raw = self.records_path.read_bytes() if self.records_path.exists() else b""
        lines, good = _parse_lines(raw)
        for obj in lines:
            key = (str(obj.get("kind", "")), int(obj["index"]))
            if key in self._records:
                continue  # first record of a key wins (put() never writes a second one)
            self._records[key] = _record_from_json(self.record_type, obj)
            if obj.get("_xyz"):
                self._xyz[key] = (int(obj["_xyz"][0]), int(obj["_xyz"][1]))
        if not repair:
            return
        if good != len(raw):  # a record cut by a kill
            with open(self.records_path, "r+b") as f:
                f.truncate(good)
                os.fsync(f.fileno())
        if self.structures_path is not None and self.structures_path.exists():
            end = max((o + n for o, n in self._xyz.values()), default=0)
            if self.structures_path.stat().st_size > end:  # a structure written before its record
                with open(self.structures_path, "r+b") as f:
                    f.truncate(end)
                    os.fsync(f.fileno())

    # ------------------------------------------------------------------ reading
    def __contains__(self, key: tuple[str, int]) -> bool:
        return (key[0], int(key[1])) in self._records

    def __len__(self) -> int:
        return len(self._records)

    def get(self, kind: str, index: int) -> R | None:
        return self._records.get((kind, int(index)))

    def done(self, kind: str = "") -> set[int]:
        """Indices stored for ``kind``."""
        return {i for k, i in self._records if k == kind}

    def records(self, kind: str | None = None) -> list[R]:
        """Records (of one kind, or all) in (kind, index) order."""
        return [r for (k, _), r in sorted(self._records.items(), key=lambda kv: kv[0]) if kind is None or k == kind]

    def structure(self, kind: str, index: int):
        """The ASE Atoms stored with a record (with its info and calculator results), or None."""
        span = self._xyz.get((kind, int(index)))
        if span is None or self.structures_path is None:
            return None
        from ase.io import read

        with open(self.structures_path, "rb") as f:
            f.seek(span[0])
            text = f.read(span[1]).decode("utf-8")
        return read(io.StringIO(text), format="extxyz")

    # ------------------------------------------------------------------ writing
    def put(self, record: R, kind: str = "", structure: Any = None) -> bool:
        """Store ``record`` (and ``structure``, an ASE Atoms) under ``(kind, record.index)``.

        The structure is appended and fsynced first, then the record line. Returns False (and writes
        nothing) when the key is already stored: storing the same shard twice is harmless.
        """
        if self.readonly:
            raise StoreError(f"{self.directory}: opened read-only")
        key = (kind, int(record.index))  # type: ignore[attr-defined]  # every record type has an index
        if key in self._records:
            return False
        line = {"kind": kind, **_record_to_json(record)}
        if structure is not None:
            if self.structures_path is None:
                raise StoreError("this store keeps no structures")
            from ase.io import write

            if self._xyz_fd is None:
                self._xyz_fd = open(self.structures_path, "ab")
            buf = io.StringIO()
            write(buf, structure, format="extxyz")
            data = buf.getvalue().encode("utf-8")
            offset = self._xyz_fd.seek(0, os.SEEK_END)
            self._xyz_fd.write(data)
            self._xyz_fd.flush()
            os.fsync(self._xyz_fd.fileno())
            line["_xyz"] = [offset, len(data)]
            self._xyz[key] = (offset, len(data))
        if self._fd is None:
            self._fd = open(self.records_path, "ab")
        self._fd.write((json.dumps(line, separators=(",", ":")) + "\n").encode("utf-8"))
        self._fd.flush()
        os.fsync(self._fd.fileno())
        self._records[key] = record
        return True

    def close(self) -> None:
        for name in ("_fd", "_xyz_fd", "_lock_fd"):
            fd = getattr(self, name, None)
            if fd is not None:
                fd.close()
                setattr(self, name, None)

    def __enter__(self) -> ResultStore[R]:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def iter_new(store: ResultStore, kind: str, items: Iterator[tuple[int, Any]]) -> Iterator[tuple[int, Any]]:
    """``(index, item)`` pairs whose ``(kind, index)`` is not stored yet (resume = skip what is stored)."""
    for index, item in items:
        if (kind, index) not in store:
            yield index, item


__all__ = [
    "ResultStore", "StoreError", "StoreHeader", "StoreLocked", "StoreMismatch", "iter_new", "model_fingerprint",
    "read_records", "settings_fingerprint",
]
