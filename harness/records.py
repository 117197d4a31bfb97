"""``results.jsonl``: one JSON record per line, the source of truth for every report.

Each line has the keys ``schema, case_id, case, backend, target, check, status, metrics,
reason`` (plus ``suite``, ``seed`` and ``time``). The JSON Schema lives in
``harness/schema/records.schema.json``; :func:`read_records` checks each line against the same
rules and names the file, the line and the field of the first problem.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from harness.errors import RecordsError

SCHEMA_VERSION = 1
STATUSES = ("pass", "fail", "skip", "xfail", "xpass", "crash", "timeout", "error")
#: Statuses that make a run exit 1.
FAILING = ("fail", "xpass", "crash", "timeout", "error")
CHECKS = ("fwd", "bwd", "determinism", "throughput")


@dataclass(frozen=True)
class Record:
    """One check of one case on one backend on one machine."""

    case_id: str
    case: dict[str, Any]
    backend: dict[str, str]
    target: dict[str, Any]
    check: str
    status: str
    metrics: dict[str, Any] = field(default_factory=dict)
    reason: str = ""
    suite: str = ""
    seed: int = 0
    time: str = ""
    schema: int = SCHEMA_VERSION

    @property
    def backend_name(self) -> str:
        return self.backend.get("name", "")

    @property
    def target_id(self) -> str:
        return self.target.get("target_id", "")

    @property
    def key(self) -> tuple[str, str, str, str]:
        """What identifies a result across files: (target, backend, case, check)."""
        return (self.target_id, self.backend_name, self.case_id, self.check)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=False, allow_nan=False, default=_jsonable)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "schema": int, "case_id": str, "case": dict, "backend": dict, "target": dict, "check": str,
    "status": str, "metrics": dict, "reason": str,
}
_OPTIONAL: dict[str, type | tuple[type, ...]] = {"suite": str, "seed": int, "time": str}


def record_from_dict(data: Any, where: str) -> Record:
    """Validate one parsed line; RecordsError names ``where`` (file:line) and the field."""
    if not isinstance(data, dict):
        raise RecordsError(f"{where}: a record must be a JSON object")
    for key, kind in _REQUIRED.items():
        if key not in data:
            raise RecordsError(f"{where}: missing field {key!r} (is this an attn-harness "
                               "results.jsonl?)")
        if not isinstance(data[key], kind) or isinstance(data[key], bool):
            raise RecordsError(f"{where}: field {key!r} must be {_kind_name(kind)}, "
                               f"got {type(data[key]).__name__}")
    for key, kind in _OPTIONAL.items():
        if key in data and (not isinstance(data[key], kind) or isinstance(data[key], bool)):
            raise RecordsError(f"{where}: field {key!r} must be {_kind_name(kind)}")
    if data["schema"] != SCHEMA_VERSION:
        raise RecordsError(f"{where}: schema version {data['schema']} is not {SCHEMA_VERSION}; "
                           "re-run with this harness version or use a matching one")
    if data["status"] not in STATUSES:
        raise RecordsError(f"{where}: field 'status' is {data['status']!r}, not one of "
                           f"{', '.join(STATUSES)}")
    if data["check"] not in CHECKS:
        raise RecordsError(f"{where}: field 'check' is {data['check']!r}, not one of "
                           f"{', '.join(CHECKS)}")
    if "name" not in data["backend"]:
        raise RecordsError(f"{where}: field 'backend' has no 'name'")
    if "target_id" not in data["target"]:
        raise RecordsError(f"{where}: field 'target' has no 'target_id'")
    unknown = set(data) - set(_REQUIRED) - set(_OPTIONAL)
    if unknown:
        raise RecordsError(f"{where}: unknown field {sorted(unknown)[0]!r}")
    return Record(**data)


def _kind_name(kind) -> str:
    names = {int: "an integer", str: "a string", dict: "an object"}
    return names.get(kind, str(kind))


def read_records(path: str | Path) -> list[Record]:
    """Every record of a results file, validated."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RecordsError(f"{path}: cannot read it ({exc.strerror})") from None
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RecordsError(f"{path}:{number}: not JSON ({exc.msg}); each line must be one "
                               "record") from None
        out.append(record_from_dict(data, f"{path}:{number}"))
    return out


def read_many(paths: Iterable[str | Path]) -> list[Record]:
    out: list[Record] = []
    for p in paths:
        out.extend(read_records(p))
    return out


class RecordWriter:
    """Appends records to a file, flushing and syncing each line as it is written."""

    def __init__(self, path: str | Path, *, append: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] = open(self.path, "a" if append else "w", encoding="utf-8")  # noqa: SIM115

    def write(self, record: Record) -> None:
        self._file.write(record.to_json() + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def iter_status(records: Iterable[Record], *statuses: str) -> Iterator[Record]:
    return (r for r in records if r.status in statuses)
