"""Case files: TOML suites under ``cases/``.

A suite file holds any of::

    [suite]                      # optional: description = "...", plus free-form notes
    description = "small cases that touch every feature"

    [defaults]                   # optional: field values every case and grid starts from
    dtype = "bfloat16"

    [[case]]                     # one case; keys are exactly the fields of harness.case.Case
    seqlen_q = 113
    seqlen_k = 203
    heads_q = 8
    heads_kv = 2
    causal = true

    [[grid]]                     # the cartesian product of its axes
    head_dim = [64, 96, 128]     # a list: one axis
    causal = [false, true]
    window = [[-1, -1], [32, 0]] # list-valued fields take a list of lists in a grid
    "seqlen_q,seqlen_k" = [[113, 203], [1, 147]]   # a comma key zips fields into one axis
    dtype = "float16"            # a scalar: the same value for every case of the grid

Every case is validated when the file is read; an error names the file, the table and the field.
"""

from __future__ import annotations

import itertools
import math
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from harness.case import FIELD_NAMES, Case, unknown_field_message
from harness.errors import InvalidCase

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

#: The most cases a run reads from its suites, all files together, unless ``--max-cases`` says
#: otherwise: counted from the tables before any case is built, so a grid of 10^12 cases is
#: refused at once instead of filling the memory.
MAX_CASES = 1_000_000
#: Fields whose value is a list, so a grid axis over them is a list of lists.
LIST_FIELDS = ("window", "seqlens_q", "seqlens_k", "checks")
TOP_LEVEL_KEYS = ("suite", "defaults", "case", "grid")


@dataclass(frozen=True)
class Suite:
    """A named list of cases read from one file (or given inline)."""

    name: str
    path: str
    description: str
    cases: tuple[Case, ...]


#: The project's own suite directory, when given (``--cases-dir``); else ``./cases``.
_PROJECT_DIR: Path | None = None


def builtin_dir() -> Path:
    """The suites shipped inside the package (``harness/case/library``), through
    importlib.resources."""
    return Path(str(resources.files("harness.case").joinpath("library")))


#: Carries ``--cases-dir`` into worker processes (spawned workers inherit the environment), so
#: their known-issue lookups read the same project files as the main process.
PROJECT_DIR_ENV = "ATTN_HARNESS_CASES_DIR"


#: Carries ``--cases-dir`` to worker processes (they read known issues there too).
PROJECT_DIR_ENV = "ATTN_HARNESS_CASES_DIR"


def set_project_dir(path: Path | str | None) -> None:
    """Use ``path`` instead of ``./cases`` as the project's own suites (``--cases-dir``), here
    and in the worker processes this one starts."""
    global _PROJECT_DIR
    _PROJECT_DIR = Path(path).resolve() if path is not None else None
    if _PROJECT_DIR is not None:
        os.environ[PROJECT_DIR_ENV] = str(_PROJECT_DIR)


def project_dir() -> Path:
    if _PROJECT_DIR is not None:
        return _PROJECT_DIR
    given = os.environ.get(PROJECT_DIR_ENV)
    return Path(given) if given else Path.cwd() / "cases"


def cases_dirs() -> list[Path]:
    """Where suite names are looked up: the project's own (``--cases-dir`` or ``./cases``) first,
    so its files shadow shipped ones of the same name, then the suites shipped in the package."""
    dirs = [project_dir(), builtin_dir()]
    seen: list[Path] = []
    for d in dirs:
        if d.is_dir() and d.resolve() not in [s.resolve() for s in seen]:
            seen.append(d)
    return seen


def available_suites() -> list[str]:
    names: set[str] = set()
    for d in cases_dirs():
        names.update(p.stem for p in d.glob("*.toml") if p.stem != "known_issues")
        if (d / "regressions").is_dir():
            names.add("regressions")
    return sorted(names)


def resolve_suite(spec: str) -> list[Path]:
    """Turn ``smoke``, ``cases/edge.toml`` or a directory into the files it names."""
    path = Path(spec)
    if path.suffix == ".toml" or path.is_dir() or "/" in spec:
        if path.is_dir():
            return sorted(path.glob("*.toml"))
        if not path.is_file():
            raise InvalidCase(f"{spec}: no such case file (give a path to a .toml file or a suite "
                              f"name: {', '.join(available_suites())})")
        return [path]
    for d in cases_dirs():
        if (d / f"{spec}.toml").is_file():
            return [d / f"{spec}.toml"]
        if (d / spec).is_dir():
            return sorted((d / spec).glob("*.toml"))
    raise InvalidCase(f"--suite {spec}: no such suite (known: {', '.join(available_suites())}; "
                      "or give a path to a .toml file)")


def load_suite(spec: str, max_cases: int = MAX_CASES, earlier: int = 0) -> list[Suite]:
    """Load every file that ``spec`` names (``max_cases``, ``earlier``: see
    :func:`parse_suite`)."""
    out: list[Suite] = []
    for p in resolve_suite(spec):
        out.append(load_file(p, max_cases, earlier))
        earlier += len(out[-1].cases)
    return out


def load_file(path: Path | str, max_cases: int = MAX_CASES, earlier: int = 0) -> Suite:
    path = Path(path)
    where = _display(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InvalidCase(f"{where}: cannot read it ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        raise InvalidCase(f"{where}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at "
                          f"offset {exc.start}); a case file is TOML, which is UTF-8: save it "
                          "as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidCase(f"{where}: not valid TOML ({exc}); fix the syntax") from None
    except RecursionError:
        raise InvalidCase(f"{where}: nested too deeply to read (arrays or tables within each "
                          "other past Python's recursion limit); no case needs that") from None
    return parse_suite(data, where, name=path.stem, max_cases=max_cases, earlier=earlier)


def parse_suite(data: Mapping[str, Any], where: str, name: str, max_cases: int = MAX_CASES,
                earlier: int = 0) -> Suite:
    """The suite a parsed case file describes, every case validated.

    Args:
        data: the file's TOML, parsed.
        where: the file as messages name it.
        name: the suite's name.
        max_cases: the most cases the run may read (``--max-cases``; 0 = no limit), this
            file's and ``earlier`` ones together: the file's tables are counted first, and a
            file past the limit is refused before any of its cases is built.
        earlier: cases the run has read from other files before this one.

    Raises:
        InvalidCase: naming the file, the table and the field.
    """
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            raise InvalidCase(f"{where}: unknown top-level key {key!r} (allowed: "
                              f"{', '.join(TOP_LEVEL_KEYS)}; cases go in [[case]] tables)")
    meta = data.get("suite", {})
    if not isinstance(meta, dict):
        raise InvalidCase(f"{where}: 'suite' must be a table ([suite])")
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict):
        raise InvalidCase(f"{where}: 'defaults' must be a table ([defaults])")
    for key in defaults:
        if key not in FIELD_NAMES:
            raise InvalidCase(f"{where}, [defaults]: {unknown_field_message(key)}")
    planned = _plan(data, where)
    _check_count(planned, where, max_cases, earlier)
    cases: list[Case] = []
    origin: dict[str, str] = {}
    for kind, label, table, axes in planned:
        built = [_build({**defaults, **table}, label)] if kind == "case" else \
            _expand_grid(defaults, axes, label)
        for case in built:
            if case.case_id in origin:
                raise InvalidCase(f"{label}: {case.label} repeats {origin[case.case_id]} "
                                  f"(same case_id {case.case_id}); remove one of them")
            origin[case.case_id] = label
            cases.append(case)
    if not cases:
        raise InvalidCase(f"{where}: holds no cases (add [[case]] or [[grid]] tables)")
    return Suite(name=name, path=where, description=str(meta.get("description", "")),
                 cases=tuple(cases))


def _plan(data: Mapping[str, Any], where: str) -> list[tuple[str, str, dict, list]]:
    """``(kind, label, table, grid axes)`` of every ``[[case]]`` and ``[[grid]]`` table, their
    shape checked, nothing built yet."""
    planned = []
    for kind in ("case", "grid"):
        tables = data.get(kind, [])
        if not isinstance(tables, list):
            raise InvalidCase(f"{where}: '{kind}' must be an array of tables ([[{kind}]])")
        for index, table in enumerate(tables, 1):
            label = f"{where}, {kind} {index}"
            if not isinstance(table, dict):
                raise InvalidCase(f"{label}: must be a table")
            planned.append((kind, label, table, _grid_axes(table, label) if kind == "grid"
                            else []))
    return planned


def _check_count(planned: list[tuple[str, str, dict, list]], where: str, max_cases: int,
                 earlier: int) -> None:
    """Refuse a file whose tables hold more cases than ``--max-cases`` allows, counted from the
    grids' axes without building a case."""
    sizes = [(label, [len(values) for _, values in axes]) for kind, label, _, axes in planned
             if kind == "grid"]
    total = sum(1 for kind, *_ in planned if kind == "case") + sum(
        math.prod(lengths) for _, lengths in sizes)
    if not max_cases or earlier + total <= max_cases:
        return
    largest = max(sizes, key=lambda s: math.prod(s[1]), default=None)
    detail = (f"; {largest[0].rpartition(', ')[2]} alone is "
              f"{' x '.join(f'{n:,}' for n in largest[1])}"
              if largest and math.prod(largest[1]) > 1 else "")
    before = f" after the {earlier:,} case(s) of the suites before it" if earlier else ""
    raise InvalidCase(f"{where}: holds {total:,} cases{detail}, more than --max-cases "
                      f"{max_cases:,} allows{before}; narrow its grids, split it, or raise "
                      "--max-cases")


def parse_inline_case(text: str) -> Case:
    """Parse ``--case '{batch = 2, seqlen_q = 113, ...}'`` (a TOML inline table)."""
    try:
        data = tomllib.loads(f"case = {text.strip()}")
    except (tomllib.TOMLDecodeError, RecursionError) as exc:
        why = exc if isinstance(exc, tomllib.TOMLDecodeError) else "nested too deeply"
        raise InvalidCase(f"--case {text[:200]!r}: not a TOML inline table ({why}); write it as "
                          "'{seqlen_q = 128, heads_q = 4, dtype = \"float16\"}'") from None
    if not isinstance(data.get("case"), dict):
        raise InvalidCase(f"--case {text!r}: must be a TOML inline table in braces")
    extra = [key for key in data if key != "case"]
    if extra:
        raise InvalidCase(f"--case {text!r}: trailing content after the inline table (key "
                          f"{extra[0]!r}); give exactly one table '{{...}}' and nothing after it")
    return _build(data["case"], "--case")


def _build(values: Mapping[str, Any], label: str) -> Case:
    for key in values:
        if key not in FIELD_NAMES:
            raise InvalidCase(f"{label}: {unknown_field_message(key)}")
    try:
        return Case(**values)
    except InvalidCase as exc:
        raise InvalidCase(f"{label}: {exc}") from None


def _grid_axes(table: Mapping[str, Any], label: str) -> list[tuple[list[str], list[Any]]]:
    """A grid's axes: ``(field names, values)`` per key, each checked for its shape."""
    axes: list[tuple[list[str], list[Any]]] = []
    for key, value in table.items():
        names = [n.strip() for n in key.split(",")]
        for n in names:
            if n not in FIELD_NAMES:
                raise InvalidCase(f"{label}: {unknown_field_message(n)}")
        values = _axis_values(names, value, label)
        axes.append((names, values))
    return axes


def _expand_grid(defaults: Mapping[str, Any], axes: list[tuple[list[str], list[Any]]],
                 label: str) -> list[Case]:
    """Every case of a grid. After the first case, each value of each axis is tried with the
    first value of every other axis (a case of the grid too), so a bad value anywhere in an
    axis is found after a sum of the axes' lengths of cases, not after most of their
    product."""

    def build(combo) -> Case:
        fields = dict(defaults)
        for (names, _), chosen in zip(axes, combo, strict=True):
            if len(names) == 1:
                fields[names[0]] = chosen
            else:
                fields.update(zip(names, chosen, strict=True))
        return _build(fields, f"{label} ({_describe(fields)})")

    first = [values[0] for _, values in axes]
    build(first)
    for i, (_, values) in enumerate(axes):
        for value in values[1:]:
            build([*first[:i], value, *first[i + 1:]])
    return [build(combo) for combo in itertools.product(*(values for _, values in axes))]


def _axis_values(names: list[str], value: Any, label: str) -> list[Any]:
    key = ",".join(names)
    if len(names) > 1:
        if not isinstance(value, list) or not all(
            isinstance(v, list) and len(v) == len(names) for v in value
        ):
            raise InvalidCase(f"{label}: {key!r} zips {len(names)} fields, so its value must be a "
                              f"list of {len(names)}-element lists, e.g. [[113, 203], [1, 147]]")
        return value
    name = names[0]
    if name in LIST_FIELDS:
        if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
            return value
        if value is None or (isinstance(value, list) and not value):
            raise InvalidCase(f"{label}: grid axis {name!r} is empty")
        raise InvalidCase(f"{label}: in a grid, {name!r} takes a list of lists (one list per "
                          f"value), e.g. {name} = [{_example(name)}]; got {value!r}")
    if isinstance(value, list):
        if not value:
            raise InvalidCase(f"{label}: grid axis {name!r} is empty")
        return value
    return [value]


def _example(name: str) -> str:
    return {"window": "[-1, -1], [64, 0]", "checks": '["fwd"], ["fwd", "bwd"]'}.get(
        name, "[3, 0, 7], [5, 5, 5]")


def _describe(fields: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in fields.items())


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def iter_cases(specs: Iterable[str], max_cases: int = MAX_CASES) -> list[tuple[str, Case]]:
    """``(suite name, case)`` for every case of every spec, in order; more than ``max_cases``
    in all (0 = no limit) is refused before the file that passes it is built."""
    out: list[tuple[str, Case]] = []
    for spec in specs:
        for suite in load_suite(spec, max_cases, earlier=len(out)):
            out.extend((suite.name, case) for case in suite.cases)
    return out
