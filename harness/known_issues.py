"""Known failures: ``cases/known_issues.toml``.

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

import operator
import re
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from harness.case import FIELD_NAMES, Case
from harness.errors import InvalidCase

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_PATH = Path(__file__).resolve().parent / "cases" / "known_issues.toml"
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

    @property
    def label(self) -> str:
        return f"{self.id} ({self.link})"

    def applies(self, case: Case, backend: dict[str, str], target) -> bool:
        if backend.get("name") != self.backend:
            return False
        if self.flavors and backend.get("flavor") not in self.flavors:
            return False
        if self.versions and not version_in(backend.get("version", ""), self.versions):
            return False
        if self.archs and target.arch not in self.archs:
            return False
        if self.targets and target.target_id not in self.targets:
            return False
        return all(_holds(case, key, want) for key, want in self.when.items())


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


def parse(data: dict[str, Any], where: str) -> list[KnownIssue]:
    out = []
    for i, entry in enumerate(data.get("issue", []), 1):
        label = f"{where}, issue {i}"
        if not isinstance(entry, dict):
            raise InvalidCase(f"{label}: must be a table")
        for key in entry:
            if key not in _KEYS:
                raise InvalidCase(f"{label}: unknown key {key!r} (keys: {', '.join(_KEYS)})")
        for key in ("id", "backend", "link"):
            if not isinstance(entry.get(key), str) or not entry[key]:
                raise InvalidCase(f"{label}: {key!r} is required (a string)")
        when = entry.get("when", {})
        for key in when:
            if key != "features" and key not in FIELD_NAMES and key not in DERIVED:
                raise InvalidCase(f"{label}: 'when' has unknown case field {key!r} (case "
                                  f"fields, 'features' or one of {', '.join(DERIVED)})")
        if not isinstance(entry.get("strict", True), bool):
            raise InvalidCase(f"{label}: 'strict' must be true or false")
        bad = [c for c in entry.get("checks", ()) if c not in ("fwd", "bwd", "determinism")]
        if bad:
            raise InvalidCase(f"{label}: 'checks' has {bad[0]!r}; use fwd, bwd or determinism")
        if entry.get("versions"):
            version_in("0", entry["versions"])  # validates the syntax
        out.append(KnownIssue(
            id=entry["id"], backend=entry["backend"], link=entry["link"],
            description=entry.get("description", ""), flavors=tuple(entry.get("flavors", ())),
            versions=entry.get("versions", ""), archs=tuple(entry.get("archs", ())),
            targets=tuple(entry.get("targets", ())), checks=tuple(entry.get("checks", ())),
            strict=bool(entry.get("strict", True)), when=dict(when)))
    return out


def load(path: Path | str = DEFAULT_PATH) -> list[KnownIssue]:
    path = Path(path)
    if not path.is_file():
        return []
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise InvalidCase(f"{path}: not valid TOML ({exc})") from None
    return parse(data, str(path))


@lru_cache(maxsize=4)
def _cached(path: str) -> tuple[KnownIssue, ...]:
    return tuple(load(path))


def match(case: Case, backend: dict[str, str], target,
          path: Path | str = DEFAULT_PATH) -> KnownIssue | None:
    """The first known issue that applies, or None."""
    for issue in _cached(str(path)):
        if issue.applies(case, backend, target):
            return issue
    return None
