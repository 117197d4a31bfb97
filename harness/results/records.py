"""``results.jsonl``: one JSON record per line, the source of truth for every report.

Each line has the keys ``schema, case_id, case, backend, target, check, status, metrics,
reason`` (plus ``suite``, ``seed``, ``profile``, ``time``, and since sweeps can be sharded
``seconds``, ``run_id``, ``shard`` and ``shard_tasks``; older files without them still read). The
versioned JSON Schema is ``harness/results/schema/records.schema.json``; :func:`record_from_dict`
enforces that very file with a small validator of its own (the keywords the schema uses, nothing
more), so any JSON Schema validator and the harness accept exactly the same records, while the
harness's errors stay one line naming the file, the line and the field. :func:`read_records`
then checks the case itself (``harness.case.case_from_dict``: cross-field rules no schema can
state).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import re
import shlex
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from harness import vocab
from harness.case import case_from_dict
from harness.errors import HarnessError, RecordsError
from harness.vocab import CHECK_NAMES as CHECKS  # noqa: F401 - re-exported
from harness.vocab import FAILING, STATUSES  # noqa: F401 - re-exported

SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).resolve().parent / "schema" / "records.schema.json"


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
    #: The profile the check ran under (quick, nightly, exhaustive); "" in records written
    #: before the field existed.
    profile: str = ""
    time: str = ""
    schema: int = SCHEMA_VERSION
    #: Wall time of this check as the run saw it, seconds (``--durations`` packs shards by it).
    seconds: float | None = None
    #: The sweep this record belongs to, shared by all its shards (``harness.shard``).
    run_id: str = ""
    #: ``I/N``: the share of the sweep that ran it (0-based); empty for an unsharded run.
    shard: str = ""
    #: Tasks (case x backend) in that share, so a report can tell a shard that stopped early.
    shard_tasks: int | None = None

    @property
    def backend_name(self) -> str:
        return self.backend.get("name", "")

    @property
    def backend_flavor(self) -> str:
        return self.backend.get("flavor", "") or ""

    @property
    def target_id(self) -> str:
        return self.target.get("target_id", "")

    @property
    def key(self) -> tuple[str, str, str, str, str]:
        """What identifies a result within one machine's files: (target, backend, flavor, case,
        check). The flavor matters: flash-attn's CK and Triton builds run on the same target."""
        return (self.target_id, self.backend_name, self.backend_flavor, self.case_id, self.check)

    def to_json(self) -> str:
        data = asdict(self)
        for key in UNSET_OMITTED:  # an unsharded run's lines stay as they were
            if data[key] in ("", None):
                del data[key]
        return json.dumps(data, sort_keys=False, allow_nan=False, default=_jsonable)


#: Fields left out of a line while unset (empty or None): they are optional in the schema.
UNSET_OMITTED = ("seconds", "run_id", "shard", "shard_tasks")


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------- schema


#: The schema's enums that come from the vocabulary: a node with ``"x-registry": NAME`` takes
#: its ``enum`` from here, so a check declared in :data:`harness.vocab.CHECKS` is valid in
#: records without an edit to the schema file (which carries the generated enums for other
#: validators: ``python -m harness.results.records --write-schema`` writes them).
REGISTRY_ENUMS = {
    "checks": lambda: list(vocab.CHECK_NAMES),
    "statuses": lambda: list(vocab.STATUSES),
    "timed-checks": lambda: list(vocab.TIMED),
}


def generated_schema(schema: Any) -> Any:
    """``schema`` with every ``x-registry`` node's enum taken from the vocabulary."""
    if isinstance(schema, list):
        return [generated_schema(v) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: generated_schema(v) for k, v in schema.items()}
    if "x-registry" in out:
        out["enum"] = REGISTRY_ENUMS[out["x-registry"]]()
    return out


def schema_file() -> dict[str, Any]:
    """The schema file as shipped (``harness/results/schema/records.schema.json``)."""
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def load_schema() -> dict[str, Any]:
    """The records JSON Schema the harness validates with: the shipped file, its enums
    generated from the vocabulary's registry (:data:`REGISTRY_ENUMS`)."""
    return _schema(vocab.CHECK_NAMES)


@functools.lru_cache(maxsize=4)
def _schema(checks: tuple[str, ...]) -> dict[str, Any]:
    return generated_schema(schema_file())


def write_schema(path: Path = SCHEMA_PATH) -> Path:
    """Write the schema with the enums of the current registry (after declaring a check)."""
    path.write_text(json.dumps(generated_schema(schema_file()), indent=2, ensure_ascii=False)
                    + "\n", encoding="utf-8")
    return path


#: JSON Schema keywords :func:`schema_errors` enforces; annotations it ignores. The schema file
#: must use no other keyword (tests/test_records.py checks), or the two validators could differ.
ENFORCED_KEYWORDS = frozenset({
    "type", "enum", "const", "required", "properties", "additionalProperties", "minimum",
    "exclusiveMinimum", "minLength", "pattern", "$ref", "allOf", "if", "then",
})
ANNOTATION_KEYWORDS = frozenset({"$schema", "$id", "$defs", "title", "description", "x-remedy",
                                 "x-registry"})

_KIND_NAMES = {"integer": "an integer", "number": "a number", "string": "a string",
               "object": "an object", "array": "an array", "boolean": "true or false",
               "null": "null"}


def _is_type(value: Any, kind: str) -> bool:
    """JSON Schema's type test (booleans are not numbers; 1.0 is an integer)."""
    if kind == "null":
        return value is None
    if kind == "boolean":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind == "integer":
        return isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if kind == "number":
        return isinstance(value, (int, float))
    if kind == "string":
        return isinstance(value, str)
    if kind == "object":
        return isinstance(value, dict)
    if kind == "array":
        return isinstance(value, list)
    raise ValueError(f"unknown JSON Schema type {kind!r}")


def _json_type(value: Any) -> str:
    for kind in ("null", "boolean", "integer", "number", "string", "object", "array"):
        if _is_type(value, kind):
            return kind
    return type(value).__name__


def _same(a: Any, b: Any) -> bool:
    """JSON equality: true is not 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    return a == b


def _field(path: tuple[str, ...]) -> str:
    return ".".join(path)


def _resolve(ref: str, root: dict[str, Any]) -> dict[str, Any]:
    if not ref.startswith("#/"):
        raise ValueError(f"only local $ref is supported, not {ref!r}")
    node: Any = root
    for part in ref[2:].split("/"):
        node = node[part]
    return node


def schema_errors(value: Any, schema: dict[str, Any], root: dict[str, Any] | None = None,
                  path: tuple[str, ...] = ()) -> Iterator[str]:
    """One-line messages for every way ``value`` breaks ``schema`` (first the most basic)."""
    root = schema if root is None else root
    if "$ref" in schema:
        yield from schema_errors(value, _resolve(schema["$ref"], root), root, path)
    name = _field(path)
    if "type" in schema:
        kinds = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_is_type(value, k) for k in kinds):
            if not path:
                yield "a record must be a JSON object"
            else:
                wanted = " or ".join(_KIND_NAMES[k] for k in kinds)
                yield f"field {name!r} must be {wanted}, got {_json_type(value)}"
            return
    if "const" in schema and not _same(value, schema["const"]):
        remedy = f": {schema['x-remedy']}" if "x-remedy" in schema else ""
        yield f"field {name!r} is {value!r}, not {schema['const']!r}{remedy}"
    if "enum" in schema and not any(_same(value, v) for v in schema["enum"]):
        yield f"field {name!r} is {value!r}, not one of {', '.join(map(str, schema['enum']))}"
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0):
            yield f"field {name!r} must not be empty"
        if "pattern" in schema and not re.search(schema["pattern"], value):
            yield f"field {name!r} is {value!r}, which does not match {schema['pattern']}"
    if _is_type(value, "number"):
        if "minimum" in schema and not value >= schema["minimum"]:
            yield f"field {name!r} is {value!r}, must be >= {schema['minimum']}"
        if "exclusiveMinimum" in schema and not value > schema["exclusiveMinimum"]:
            yield f"field {name!r} is {value!r}, must be > {schema['exclusiveMinimum']}"
    if isinstance(value, dict):
        yield from _object_errors(value, schema, root, path)
    for sub in schema.get("allOf", ()):
        yield from schema_errors(value, sub, root, path)
    if "if" in schema and not any(True for _ in schema_errors(value, schema["if"], root, path)):
        yield from schema_errors(value, schema.get("then", {}), root, path)


def _object_errors(value: dict, schema: dict, root: dict, path: tuple[str, ...]) -> Iterator[str]:
    for key in schema.get("required", ()):
        if key not in value:
            if path:
                yield f"field {_field(path)!r} has no {key!r}"
            else:
                yield f"missing field {key!r} (is this an attn-harness results.jsonl?)"
    properties = schema.get("properties", {})
    for key, sub in properties.items():
        if key in value:
            yield from schema_errors(value[key], sub, root, (*path, key))
    if schema.get("additionalProperties", True) is False:
        for key in value:
            if key not in properties:
                yield f"unknown field {_field((*path, key))!r}"


def record_from_dict(data: Any, where: str) -> Record:
    """Validate one parsed line against the schema; RecordsError names ``where`` and the field."""
    for problem in schema_errors(data, load_schema()):
        raise RecordsError(f"{where}: {problem}")
    known = set(Record.__dataclass_fields__)
    return Record(**{k: v for k, v in data.items() if k in known})


def check_case(record: Record, where: str) -> None:
    """The case must be a valid :class:`harness.case.Case` (rules beyond the schema's reach),
    and ``case_id`` must be that case's id (a record edited by hand, or merged from another
    case, would otherwise be compared and resumed as the wrong case)."""
    try:
        case = case_from_dict(record.case)
    except HarnessError as exc:
        raise RecordsError(f"{where}: field 'case': {exc}") from None
    if case.case_id != record.case_id:
        raise RecordsError(f"{where}: field 'case_id' is {record.case_id!r} but its case has id "
                           f"{case.case_id!r}; the record was edited or belongs to another case")


def read_records(path: str | Path, *, require_records: bool = False) -> list[Record]:
    """Every record of a results file, validated (schema, then the case).

    Args:
        path: the results file.
        require_records: a file without a single record is bad input (``report`` and
            ``compare``: an empty file from a failed nightly leg must not read as success).

    Raises:
        RecordsError: the file is missing, unreadable, not records, or (with
            ``require_records``) empty; the message names the file and line.
    """
    path = Path(path)
    out = [record for record, _ in _parse_lines(_read_text(path), path)]
    if require_records and not out:
        raise RecordsError(f"{path}: holds no records (an empty results file is not a result; "
                           "did the run that wrote it fail?)")
    return out


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RecordsError(f"{path}: cannot read it ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise RecordsError(f"{path}: not UTF-8 text; is this an attn-harness results.jsonl?") \
            from None


def _parse_lines(text: str, path: Path) -> Iterator[tuple[Record, int]]:
    """``(record, line number)`` of every non-blank line; RecordsError at the first bad one."""
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        yield parse_line(line, where), number


def parse_line(line: str, where: str) -> Record:
    """One line as a validated record (strict JSON: no NaN, Infinity or overflowing 1e999)."""
    try:
        data = json.loads(line, parse_constant=_reject_constant, parse_float=_finite_float)
    except (json.JSONDecodeError, ValueError) as exc:
        msg = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise RecordsError(f"{where}: not JSON ({msg}); each line must be one record") \
            from None
    except RecursionError:
        raise RecordsError(f"{where}: nested too deeply to read (JSON arrays or objects within "
                           "each other past Python's recursion limit); not a record") from None
    if _SURROGATE_ESCAPE.search(line):
        _refuse_lone_surrogates(data, where)
    record = record_from_dict(data, where)
    check_case(record, where)
    return record


#: A JSON escape of a UTF-16 surrogate: the only way a lone one gets into a decoded record.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _refuse_lone_surrogates(data: Any, where: str) -> None:
    """A string holding half of a surrogate pair (``"\\ud800"``) is not Unicode text: it
    cannot be written into a report, a TOML file or a terminal as UTF-8."""
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RecordsError(f"{where}: holds a lone surrogate (U+{ord(exc.object[exc.start]):04X}"
                           ", half of a UTF-16 pair), which is not text; not a record written by "
                           "attn-harness") from None


def _torn(line: str) -> bool:
    """Whether a last line without a newline is a record cut short (not JSON at all)."""
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return True
    except RecursionError:
        return False  # whole, if nested too deeply: parse_line says so
    return False


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    """``json.loads`` turns ``1e999`` into inf without a word; a record holds finite numbers."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} overflows a float (records hold finite numbers; a missing "
                         "value is null)")
    return value


def read_many(paths: Iterable[str | Path], *, require_records: bool = False) -> list[Record]:
    """The records of several files, in order (``require_records``: see :func:`read_records`;
    every file must then hold at least one record)."""
    out: list[Record] = []
    for p in paths:
        out.extend(read_records(p, require_records=require_records))
    return out


def read_for_resume(path: str | Path) -> tuple[list[Record], str]:
    """The records of a results file a run appends to (``--resume``), and a note.

    A run killed mid-write, or one that hit a full disk, can leave its last line torn: no
    newline at the end, and not valid JSON. That line is cut from the file (so the records
    appended next start on a line of their own) and the note says so; a bad line anywhere else
    is still an error, as for ``report`` and ``compare``. A missing file holds no records.

    Returns:
        ``(records, note)``; ``note`` is empty when nothing was dropped.
    """
    path = Path(path)
    if not path.exists():
        return [], ""
    text = _read_text(path)
    note = ""
    tail = text.rpartition("\n")[2]
    if tail.strip() and _torn(tail):
        line = text.count("\n") + 1
        text = text[:len(text) - len(tail)]
        try:
            os.truncate(path, len(text.encode("utf-8")))
        except OSError as err:
            raise RecordsError(f"{path}:{line}: the last line is torn and cannot be cut "
                               f"({err.strerror}); remove that line") from None
        note = (f"{path}:{line}: dropped a torn last line ({len(tail)} characters, not a whole "
                "record: the run that wrote it was interrupted mid-write); its check runs again")
    records = [record for record, _ in _parse_lines(text, path)]
    if text and not text.endswith("\n"):  # a whole last record, only its newline missing
        try:
            with open(path, "a", encoding="utf-8") as out:
                out.write("\n")
        except OSError as err:
            raise RecordsError(f"cannot write {path}: {err.strerror}; records so far are "
                               "kept") from None
    return records, note


def _no_follow(path: str, flags: int) -> int:
    """``open``'s opener that refuses a symlink (``O_NOFOLLOW``): a link made in place of a
    results file would have the records written into whatever file it points at."""
    return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0), 0o666)


class RecordWriter:
    """Appends records to a file, flushing and syncing each line as it is written.

    A write that fails (a full disk, a read-only or vanished file system, lost permission)
    raises :class:`RecordsError` in one line; the bytes of the record that failed are cut again
    where the file system allows it, so the file holds exactly the records written before (and
    where it does not, ``--resume`` drops the torn last line: :func:`read_for_resume`).
    """

    def __init__(self, path: str | Path, *, append: bool = False) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Unbuffered bytes: a failed write leaves nothing queued for close() to retry.
            self._file: IO[bytes] = open(self.path, "ab" if append else "wb", buffering=0,  # noqa: SIM115
                                         opener=_no_follow)
            self._good = self._file.seek(0, os.SEEK_END)
        except OSError as exc:
            raise self._error(exc) from None

    def _error(self, exc: OSError) -> RecordsError:
        if self.path.is_symlink():
            return RecordsError(f"{self.path} is a symlink (to {os.readlink(self.path)}); "
                                "records are written only into a file of their own: remove the "
                                "link")
        why = exc.strerror or str(exc)
        return RecordsError(f"cannot write {self.path}: {why}; records so far are kept")

    def write(self, record: Record) -> None:
        data = (record.to_json() + "\n").encode("utf-8")
        try:
            view = memoryview(data)
            while view:
                view = view[self._file.write(view):]
            os.fsync(self._file.fileno())
        except OSError as exc:
            with contextlib.suppress(OSError):
                self._file.truncate(self._good)
            raise self._error(exc) from None
        self._good += len(data)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def iter_status(records: Iterable[Record], *statuses: str) -> Iterator[Record]:
    return (r for r in records if r.status in statuses)


def finite_or_none(x: Any) -> float | None:
    """A metric as a finite float, or None (missing, null or not a number)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


# --------------------------------------------------------------------------------- merging

#: Target fields that tell two setups of one machine apart (flash-attn's CK and Triton builds on
#: one MI300X share a target_id), with the short name a label uses.
SETUP_FIELDS = (("libraries", "libraries"), ("flash_attn_flavor", "flash-attn"),
                ("flash_attn", "flash-attn"),
                ("torch", "torch"), ("triton", "triton"), ("runtime", "runtime"),
                ("driver", "driver"), ("sdpa_rocm_library", "sdpa"), ("device_name", "device"),
                ("cpu_threads", "threads"), ("python", "python"), ("extra", "extra"))


def setup_fingerprint(target: dict[str, Any]) -> tuple[str, ...]:
    """What makes results comparable: the target id and the software it ran."""
    return (target.get("target_id", ""),
            *(json.dumps(target.get(f, ""), sort_keys=True) for f, _ in SETUP_FIELDS))


def setup_labels(targets: Iterable[dict[str, Any]]) -> dict[tuple[str, ...], str]:
    """A readable, unique label per setup: the target id, plus what differs where one target id
    ran several setups (``rocm6.2-gfx942-mi300x (flash-attn rocm-ck)``)."""
    by_id: dict[str, dict[tuple[str, ...], dict[str, Any]]] = {}
    for t in targets:
        by_id.setdefault(t.get("target_id", ""), {}).setdefault(setup_fingerprint(t), t)
    labels: dict[tuple[str, ...], str] = {}
    for tid, setups in by_id.items():
        if len(setups) == 1:
            labels[next(iter(setups))] = tid
            continue
        differing = [(f, name) for f, name in SETUP_FIELDS
                     if len({json.dumps(t.get(f, ""), sort_keys=True)
                             for t in setups.values()}) > 1]
        seen: dict[str, int] = {}
        for fp, t in setups.items():
            parts = [f"{name} {_short(t.get(f))}" for f, name in differing if f != "extra"]
            label = f"{tid} ({', '.join(parts)})" if parts else tid
            seen[label] = seen.get(label, 0) + 1
            labels[fp] = label if seen[label] == 1 else f"{label} #{seen[label]}"
    return labels


def _short(value: Any) -> str:
    if value in ("", None, {}):
        return "none"
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in sorted(value.items()))
    return str(value)


def merge_records(records: Iterable[Record]) -> tuple[list[Record], int]:
    """Records of many files as one set: where two records are the same check of the same case
    on the same backend and setup, the later one wins. Returns the kept records (in order of
    first appearance) and how many were superseded."""
    kept: dict[tuple, Record] = {}
    superseded = 0
    for r in records:
        key = (setup_fingerprint(r.target), r.backend_name, r.backend_flavor, r.case_id, r.check)
        if key in kept:
            superseded += 1
        kept[key] = r
    return list(kept.values()), superseded


# ------------------------------------------------------------------ reading a record's parts


def replay_command(record: Record) -> str:
    """The one command that replays a record's check on any machine."""
    case = case_of(record)
    return " ".join([
        "attn-harness run",
        f"--backend {shlex.quote(record.backend_name)}",
        f"--checks {record.check}",
        f"--seed {int(record.seed)}",
        f"--case {shlex.quote(case.to_inline_toml())}",
    ])


def case_of(record: Record):
    """The record's :class:`~harness.case.Case` (parsed once per distinct case)."""
    return _case(json.dumps(record.case, sort_keys=True))


@functools.lru_cache(maxsize=4096)
def _case(canonical: str):
    return case_from_dict(json.loads(canonical))


def backend_label(r: Record) -> str:
    """The backend with its flavor: ``flash-attn [rocm-ck]``."""
    return f"{r.backend_name} [{r.backend_flavor}]" if r.backend_flavor else r.backend_name


def main(argv: list[str] | None = None) -> int:
    """``python -m harness.results.records --write-schema``: regenerate the schema file's enums
    from the registry."""
    parser = argparse.ArgumentParser(prog="python -m harness.results.records",
                                     description=main.__doc__.splitlines()[0])
    parser.add_argument("--write-schema", action="store_true", required=True,
                        help="rewrite harness/results/schema/records.schema.json")
    parser.parse_args(argv)
    print(f"wrote {write_schema()}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
