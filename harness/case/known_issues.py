"""Known failures: ``harness/case/library/known_issues.toml``, plus a project's own
``./cases/known_issues.toml``, which adds entries to the shipped ones.

Each ``[[issue]]`` names a backend (and optionally flavors, a version range, architectures) and a
case predicate. A matching case runs as a strict expected failure: a failure is recorded as
``xfail``; a pass as ``xpass``, which fails the run until the entry is updated, so a fix shows up
instead of hiding. ``checks`` narrows an entry to some checks. ``strict = false`` is for
precision issues that show on some shapes only: a failure is still ``xfail``, a pass stays a
plain ``pass`` (it would otherwise be an xpass on most cases). Example::

    [[issue]]
    id = "ck-softcap-ignored"
    backend = "flash-attn"
    flavors = ["rocm-ck"]
    versions = ">=2.6.0, <3"           # of the backend (optional)
    archs = ["gfx90a", "gfx942"]       # optional
    when = { softcap = ">0" }          # every condition must hold; see `matches_value`
    link = "https://github.com/ROCm/flash-attention/blob/main/csrc/flash_attn_ck/mha_fwd.cpp"
    description = "softcap is accepted and ignored"

``when`` keys are case fields (``softcap``, ``head_dim``, ``causal`` ...), ``features`` (a list
that must all be on) or derived properties of the case (:data:`DERIVED`, such as
``rows_without_keys = true``: some query row sees no key). Values are literals (equality),
lists (membership) or comparison strings (``">0"``, ``">=128"``, ``"!=64"``).
"""

from __future__ import annotations

import dataclasses
import difflib
import operator
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from harness.case import FIELD_NAMES, Case
from harness.case.suites import project_dir
from harness.errors import InvalidCase
from harness.escape import md
from harness.vocab import FEATURES, JUDGED

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

#: The shipped file (kept for callers that name it; :func:`default_paths` adds the project's).
DEFAULT_PATH = Path(__file__).resolve().parent / "library" / "known_issues.toml"
#: Case properties a ``when`` may test besides the fields.
DERIVED = ("rows_without_keys",)
_OPS = {">=": operator.ge, "<=": operator.le, "!=": operator.ne, "==": operator.eq,
        ">": operator.gt, "<": operator.lt}
_KEYS = ("id", "backend", "flavors", "versions", "archs", "targets", "checks", "strict", "when",
         "link", "description")


@dataclass(frozen=True)
class KnownIssue:
    id: str
    backend: str
    link: str
    description: str = ""
    flavors: tuple[str, ...] = ()
    versions: str = ""
    archs: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    checks: tuple[str, ...] = ()
    strict: bool = True
    when: dict[str, Any] = field(default_factory=dict)
    #: Where the entry is written: ``file:line`` of its id (metadata).
    source: str = field(default="", compare=False)

    @property
    def label(self) -> str:
        return f"{self.id} ({self.link})"

    def applies(self, case: Case, backend: dict[str, str], target) -> bool:
        if not self.applies_to_setup(backend, target):
            return False
        return all(_holds(case, key, want) for key, want in self.when.items())

    def applies_to_setup(self, backend: dict[str, str], target) -> bool:
        """Whether the entry is about this backend (flavor, version) and machine, whatever the
        case."""
        if backend.get("name") != self.backend:
            return False
        if self.flavors and backend.get("flavor") not in self.flavors:
            return False
        if self.versions and not version_in(backend.get("version", ""), self.versions):
            return False
        if self.archs and target.arch not in self.archs:
            return False
        return not (self.targets and target.target_id not in self.targets)


def _holds(case: Case, key: str, want: Any) -> bool:
    if key == "features":
        return set(want) <= case.features
    value = getattr(case, key)
    if isinstance(value, tuple):
        value = list(value)
    return matches_value(value, want)


def matches_value(value: Any, want: Any) -> bool:
    """Literal equality, list membership, or a comparison string such as ``">=128"``."""
    if isinstance(want, str):
        m = re.fullmatch(r"\s*(>=|<=|!=|==|>|<)\s*(-?\d+(?:\.\d+)?)\s*", want)
        if m and isinstance(value, (int, float)) and not isinstance(value, bool):
            return _OPS[m.group(1)](value, float(m.group(2)))
        return value == want
    if isinstance(want, list) and not isinstance(value, list):
        return value in want
    return value == want


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def version_in(version: str, spec: str) -> bool:
    """``2.8.3`` in ``">=2.6.0, <3"``; an unknown version matches no range."""
    have = _version_tuple(version)
    if not have:
        return False
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(>=|<=|!=|==|>|<)\s*([\d.]+)\s*", part)
        if not m:
            raise InvalidCase(f"known issues: version range {spec!r} is not like '>=2.6, <3'")
        want = _version_tuple(m.group(2))
        width = max(len(have), len(want))
        a = have + (0,) * (width - len(have))
        b = want + (0,) * (width - len(want))
        if not _OPS[m.group(1)](a, b):
            return False
    return True


# ------------------------------------------------------------------------------ validation

_COMPARISON = re.compile(r"\s*(>=|<=|!=|==|>|<)\s*(-?\d+(?:\.\d+)?)\s*")
#: Entry keys that hold a list of strings, and keys that hold one string.
_LIST_KEYS = ("flavors", "archs", "targets", "checks")
_STRING_KEYS = ("id", "backend", "versions", "link", "description")
_JUDGED = JUDGED


def _field_kind(name: str) -> str:
    """bool, int, float, str or list: what TOML value a case field takes (from its annotation;
    fields added later are typed alike, so no table here needs updating)."""
    if name in DERIVED:
        return "bool"
    annotation = str(_FIELD_TYPES.get(name, ""))
    for kind, marker in (("list", "tuple"), ("bool", "bool"), ("int", "int"),
                         ("float", "float"), ("str", "str")):
        if annotation.startswith(marker) or (kind == "list" and marker in annotation):
            return kind
    return "any"


_FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(Case)}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _scalar_ok(kind: str, value: Any) -> bool:
    if kind == "bool":
        return isinstance(value, bool)
    if kind in ("int", "float"):
        return _is_number(value)
    if kind == "str":
        return isinstance(value, str)
    if kind == "list":
        return isinstance(value, list)
    return True


def when_problem(key: str, want: Any) -> str | None:
    """Why ``when = { key = want }`` can never mean what it says, or None when it is fine."""
    if key == "features":

        if not isinstance(want, list) or not all(isinstance(f, str) for f in want):
            return (f"'features' is {want!r}; it must be a list of feature names, e.g. "
                    '["causal"]')
        unknown = [f for f in want if f not in FEATURES]
        if unknown:
            return f"feature {unknown[0]!r} is not one of {', '.join(FEATURES)}"
        return None
    kind = _field_kind(key)
    if kind in ("int", "float") and isinstance(want, str):
        if not _COMPARISON.fullmatch(want):
            return (f"{key} = {want!r} is not a comparison like '>=128', '>0' or '!=64' "
                    f"({key} is a number)")
        return None
    if _scalar_ok(kind, want):
        return None
    if isinstance(want, list) and kind != "list" and all(_scalar_ok(kind, v) for v in want):
        return None  # membership
    if kind == "list" and isinstance(want, list) and all(isinstance(v, list) for v in want):
        return None
    wanted = {"bool": "true or false (or a list of them)",
              "int": "a number, a list of numbers or a comparison string such as '>=128'",
              "float": "a number, a list of numbers or a comparison string such as '>0'",
              "str": "a string or a list of strings",
              "list": "a list (or a list of lists)"}.get(kind, "a value")
    return f"{key} = {want!r} must be {wanted}"


def _entry_problem(entry: dict[str, Any]) -> tuple[str, str] | None:
    """``(key, message)`` for the first mistake in one ``[[issue]]`` table, or None."""
    for key in entry:
        if key not in _KEYS:
            close = difflib.get_close_matches(key, _KEYS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            return key, f"unknown key {key!r} ({hint}keys: {', '.join(_KEYS)})"
    for key in ("id", "backend", "link"):
        if not isinstance(entry.get(key), str) or not entry[key]:
            return key, f"{key!r} is required (a non-empty string)"
    for key in _STRING_KEYS:
        if key in entry and not isinstance(entry[key], str):
            return key, f"{key!r} is {entry[key]!r}; it must be a string"
    for key in _LIST_KEYS:
        value = entry.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            return key, f"{key!r} is {value!r}; it must be a list of strings, e.g. [{key!r}]" \
                .replace(f"[{key!r}]", '["fwd"]' if key == "checks" else '["..."]')
    bad = [c for c in entry.get("checks", ()) if c not in _JUDGED]
    if bad:
        return "checks", f"'checks' has {bad[0]!r}; use {', '.join(_JUDGED)}"
    if not isinstance(entry.get("strict", True), bool):
        return "strict", f"'strict' is {entry['strict']!r}; it must be true or false"
    if entry.get("versions"):
        try:
            version_in("0", entry["versions"])
        except InvalidCase as exc:
            return "versions", str(exc).removeprefix("known issues: ")
    when = entry.get("when", {})
    if not isinstance(when, dict):
        return "when", f"'when' is {when!r}; it must be a table, e.g. {{ softcap = \">0\" }}"
    for key, want in when.items():
        if key != "features" and key not in FIELD_NAMES and key not in DERIVED:
            return key, (f"'when' has unknown case field {key!r} (case fields, 'features' or "
                         f"one of {', '.join(DERIVED)})")
        problem = when_problem(key, want)
        if problem:
            return key, f"'when': {problem}"
    return None


def _issue_lines(text: str) -> list[int]:
    """Line numbers (1-based) of the ``[[issue]]`` headers of a file's text."""
    return [n for n, line in enumerate(text.splitlines(), 1)
            if re.match(r"\s*\[\[\s*\"?issue\"?\s*\]\]", line)]


def _key_line(text: str, index: int, key: str) -> int | None:
    """The line of ``key`` within the ``index``-th (1-based) ``[[issue]]`` table of ``text``:
    the first line of the table that assigns it, else the table's header line."""
    headers = _issue_lines(text)
    if not 0 < index <= len(headers):
        return None
    lines = text.splitlines()
    first = headers[index - 1]
    last = headers[index] - 1 if index < len(headers) else len(lines)
    pattern = re.compile(rf"(^|[{{,\s]){re.escape(key)}\s*=")
    for n in range(first, last + 1):
        if pattern.search(lines[n - 1].split("#", 1)[0]):
            return n
    return first


def parse(data: dict[str, Any], where: str, text: str = "") -> list[KnownIssue]:
    """The entries of one file's parsed TOML, validated.

    Args:
        data: the parsed file.
        where: the file, for messages.
        text: the file's text; with it, messages name the line of the offending key.

    Raises:
        InvalidCase: ``<file>:<line>, issue <n> (<id>): <what is wrong with which key>``.
    """
    for key in data:
        if key != "issue":
            return _fail(where, text, None, None, key,
                         f"unknown top-level key {key!r}; entries are [[issue]] tables")
    entries = data.get("issue", [])
    if not isinstance(entries, list):
        _fail(where, text, None, None, "issue", "'issue' must be an array of tables ([[issue]])")
    out = []
    for i, entry in enumerate(entries, 1):
        if not isinstance(entry, dict):
            _fail(where, text, i, None, "issue", "must be a table")
        problem = _entry_problem(entry)
        if problem:
            _fail(where, text, i, entry.get("id"), *problem)
        line = _key_line(text, i, "id") if text else None
        out.append(KnownIssue(
            id=entry["id"], backend=entry["backend"], link=entry["link"],
            description=entry.get("description", ""), flavors=tuple(entry.get("flavors", ())),
            versions=entry.get("versions", ""), archs=tuple(entry.get("archs", ())),
            targets=tuple(entry.get("targets", ())), checks=tuple(entry.get("checks", ())),
            strict=bool(entry.get("strict", True)), when=dict(entry.get("when", {})),
            source=f"{where}:{line}" if line else where))
    return out


def _fail(where: str, text: str, index: int | None, issue_id: Any, key: str, message: str):
    line = None
    if text and index is not None:
        line = _key_line(text, index, key)
    elif text:
        m = re.search(rf"(?m)^\s*\[*\s*{re.escape(key)}\b", text)
        line = text.count("\n", 0, m.start()) + 1 if m else None
    place = f"{where}:{line}" if line else where
    if index is not None:
        place += f", issue {index}" + (f" ({issue_id})" if isinstance(issue_id, str) else "")
    raise InvalidCase(f"{place}: {message}")


# ---------------------------------------------------------------------------------- files


def shipped_path() -> Path:
    """The known issues that ship with the package (``harness/case/library/known_issues.toml``)."""
    return Path(str(resources.files("harness.case").joinpath("library", "known_issues.toml")))


def default_paths() -> list[Path]:
    """The shipped file, then the project's own ``known_issues.toml`` (which adds to it) in
    :func:`harness.case.suites.project_dir` (``--cases-dir``, else ``./cases``), where that exists
    and is not the shipped file itself."""
    paths = [shipped_path()]
    project = project_dir() / "known_issues.toml"
    if project.is_file() and project.resolve() != paths[0].resolve():
        paths.append(project)
    return paths


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def load_file(path: Path | str) -> list[KnownIssue]:
    """One file's entries; a missing file holds none.

    Raises:
        InvalidCase: the file is unreadable, not TOML (with its line and column) or has a bad
            entry (with the line of the key).
    """
    path = Path(path)
    where = _display(path)
    if not path.is_file():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidCase(f"{where}: cannot read it ({exc})") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = re.search(r"\(at line (\d+), column (\d+)\)", str(exc))
        place = f"{where}:{m.group(1)}:{m.group(2)}" if m else where
        raise InvalidCase(f"{place}: not valid TOML ({exc}); fix the syntax") from None
    except RecursionError:
        raise InvalidCase(f"{where}: nested too deeply to read (arrays or tables within each "
                          "other past Python's recursion limit); fix the file") from None
    return parse(data, where, text)


def load(paths: Path | str | Sequence[Path | str] | None = None) -> list[KnownIssue]:
    """The entries of ``paths`` (default :func:`default_paths`), in order, validated.

    Raises:
        InvalidCase: as :func:`load_file`; or an id that two entries share.
    """
    if paths is None:
        paths = default_paths()
    elif isinstance(paths, (str, Path)):
        paths = [paths]
    out: list[KnownIssue] = []
    seen: dict[str, str] = {}
    for path in paths:
        for issue in load_file(path):
            if issue.id in seen:
                raise InvalidCase(f"{issue.source}: 'id' {issue.id!r} is already the id of "
                                  f"the entry at {seen[issue.id]}; ids must be unique")
            seen[issue.id] = issue.source
            out.append(issue)
    return out


def validate(paths: Path | str | Sequence[Path | str] | None = None) -> list[KnownIssue]:
    """Check the known-issue files before anything runs (the CLI and the plugin call this in
    the main process, so a mistake is one line and exit 2, not a traceback in every worker).
    Returns the entries."""
    return load(paths)


@lru_cache(maxsize=4)
def _cached(paths: tuple[str, ...]) -> tuple[KnownIssue, ...]:
    return tuple(load(list(paths)))


def match(case: Case, backend: dict[str, str], target,
          paths: Path | str | Sequence[Path | str] | None = None, *,
          check: str | None = None) -> KnownIssue | None:
    """The first known issue that applies, or None (``paths``: as :func:`load`). With
    ``check``, only entries that cover it: an entry narrowed to ``bwd`` must not hide a later
    one about ``fwd`` of the same cases."""
    if paths is None:
        paths = default_paths()
    elif isinstance(paths, (str, Path)):
        paths = [paths]
    for issue in _cached(tuple(str(p) for p in paths)):
        if check is not None and issue.checks and check not in issue.checks:
            continue
        if issue.applies(case, backend, target):
            return issue
    return None


# ------------------------------------------------------------------------ after the run


def unmatched(records: Iterable[Any], issues: Iterable[KnownIssue]) -> list[KnownIssue]:
    """Entries that were consulted in a run but matched none of its cases.

    An entry is consulted when some record's backend and machine are the entry's (backend,
    flavors, versions, archs, targets) and, for an entry narrowed by ``checks``, the record is
    one of those checks. It matched when a record carries its id in ``metrics["known_issue"]``
    (set by :func:`harness.run.worker.execute`). Entries for other backends or machines are not
    listed: they had no chance to match.
    """
    records = list(records)
    matched = {r.metrics.get("known_issue") for r in records}
    out = []
    for issue in issues:
        if issue.id in matched:
            continue
        if any(issue.applies_to_setup(r.backend, _TargetView(r.target))
               and (not issue.checks or r.check in issue.checks) for r in records):
            out.append(issue)
    return out


class _TargetView:
    """A record's target dict seen as the attributes :meth:`KnownIssue.applies` reads."""

    def __init__(self, target: dict[str, Any]) -> None:
        self.arch = target.get("arch", "")
        self.target_id = target.get("target_id", "")


def section(records: Iterable[Any], issues: Iterable[KnownIssue]) -> str:
    """The report section listing :func:`unmatched` entries (empty when there are none)."""
    stale = unmatched(records, issues)
    if not stale:
        return ""
    rows = "\n".join(
        f"| {md(i.id, code=True)} | {md(i.backend, code=True)}"
        f"{' ' + md(','.join(i.flavors)) if i.flavors else ''} | {md(i.source)} | "
        f"{md((i.description.splitlines() or [''])[0][:120])} |" for i in stale)
    return ("## Known issues that matched nothing\n\nThese entries apply to a backend and "
            "machine of this run but matched none of its cases: the cases that showed them were "
            "not run, or the entry's `when` no longer describes them. Check the entry.\n\n"
            "| id | backend | where | description |\n|---|---|---|---|\n" + rows)
