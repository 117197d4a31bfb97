"""The jury: when several backends run the same case, how far each is from the others and from
the reference, and which one is the outlier.

Each backend's forward check leaves the output on a seeded sample of query rows (the same rows
for every backend: the sample depends on the case and the seed only) together with the
reference on those rows and the tolerance of the parity rule. After the run, :func:`deliberate`
compares them. This matters most where the exact reference of every row is too expensive
(row-sampled verdicts): there, agreement of independent kernels is the second witness.

The jury owns only what it writes: :func:`prepare` makes a fresh, uniquely named directory
(``<out>/jury/run-*``, with a marker file) and refuses a symlinked ``<out>/jury``, which would
send the tensors outside ``--out``; :func:`deliberate` deletes the tensors it saved
(``<case_id>/<backend>.pt``) and the directories it made once empty, nothing else.
"""

from __future__ import annotations

import contextlib
import json
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import median

import torch
from tabulate import tabulate

from harness.case import Case
from harness.errors import HarnessError
from harness.escape import md
from harness.exact.reference import _row_mask
from harness.results import outdir

#: Written into the directory :func:`prepare` makes: what it is, for anyone who finds it.
MARKER = "ATTN_HARNESS_JURY"
_CASE_DIR = re.compile(r"[0-9a-f]{12}")


def prepare(out_dir: str | Path) -> Path:
    """A fresh directory for this run's jury tensors: ``<out_dir>/jury/run-<unique>``.

    Raises:
        HarnessError: ``<out_dir>/jury`` is a symlink or not a directory.
    """
    root = Path(out_dir) / "jury"
    _refuse_symlink(root)
    if root.exists() and not root.is_dir():
        raise HarnessError(f"{root} is a file, not a directory: move it away (the jury keeps "
                           "its tensors there)")
    root.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=root))
    (run_dir / MARKER).write_text("output rows saved by attn-harness for the jury; deleted "
                                  "once judged\n", encoding="utf-8")
    return run_dir


def _refuse_symlink(path: Path) -> None:
    if path.is_symlink():
        raise HarnessError(f"{path} is a symlink (to {path.readlink()}); the jury writes and "
                           "deletes only inside --out: remove the link or choose another --out")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:80] or "backend"


def save_rows(directory: str | Path, case: Case, backend: str, inputs, rows, kernel_out,
              ref, allowed: float, kind: str) -> Path:
    """Keep a backend's output (and the reference) on the sampled rows of ``case``."""
    _refuse_symlink(Path(directory))
    mask = _row_mask(inputs, rows)
    if mask is None:
        mask = torch.ones(inputs.q.shape[:-2], dtype=torch.bool, device=inputs.device)
    path = Path(directory) / case.case_id / f"{_slug(backend)}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"backend": backend, "label": case.label, "kind": kind, "allowed": allowed,
                "out": kernel_out.detach()[mask].to("cpu", torch.float64),
                "ref": ref.out.detach()[mask].to("cpu", torch.float64)}, path)
    return path


@dataclass
class JuryVerdict:
    """How the backends that ran one case compare.

    Attributes:
        case_id, label: the case.
        kind: exact or sampled-rows (how the reference was computed).
        allowed: the parity rule's tolerance for the output.
        to_reference: backend -> max |out - reference| on the rows.
        pairwise: backend -> backend -> max |difference| on the rows.
        outlier: the backend that stands apart, or None.
        finding: one line for people.
    """

    case_id: str
    label: str
    kind: str
    allowed: float
    to_reference: dict[str, float] = field(default_factory=dict)
    pairwise: dict[str, dict[str, float]] = field(default_factory=dict)
    outlier: str | None = None
    finding: str = ""


def _distance(a: torch.Tensor, b: torch.Tensor) -> float:
    d = (a - b).abs()
    if not torch.isfinite(d).all():
        return float("inf")
    return float(d.max()) if d.numel() else 0.0


def judge_case(case_id: str, entries: list[dict]) -> JuryVerdict:
    """Compare the backends of one case (entries as saved by :func:`save_rows`)."""
    first = entries[0]
    allowed = max(e["allowed"] for e in entries)
    verdict = JuryVerdict(case_id, first["label"], first["kind"], allowed)
    names = [e["backend"] for e in entries]
    for e in entries:
        verdict.to_reference[e["backend"]] = _distance(e["out"], e["ref"])
        verdict.pairwise[e["backend"]] = {o["backend"]: _distance(e["out"], o["out"])
                                          for o in entries if o is not e}
    off = [n for n in names if not verdict.to_reference[n] <= allowed]
    spread = {n: median(verdict.pairwise[n].values()) for n in names}
    if not off:
        verdict.finding = "all agree with the reference and with each other"
    elif len(off) == len(names):
        agree = all(d <= allowed for n in names for d in verdict.pairwise[n].values())
        verdict.finding = ("every backend disagrees with the reference, but they agree with each "
                           "other: suspect the case's semantics" if agree else
                           "every backend disagrees with the reference and with each other")
    else:
        verdict.outlier = max(off, key=lambda n: (verdict.to_reference[n], spread[n]))
        verdict.finding = (f"{', '.join(off)} disagree(s) with the reference while "
                           f"{', '.join(n for n in names if n not in off)} agree(s)")
    return verdict


def deliberate(directory: str | Path, *, keep: bool = False) -> list[JuryVerdict]:
    """Judge every case that more than one backend left rows for; unless ``keep``, delete the
    tensors (``<case_id>/*.pt``), the marker and the directories :func:`prepare` made, each only
    once empty. Nothing else in ``directory`` is touched; a symlinked one is refused."""
    root = Path(directory)
    _refuse_symlink(root)
    if root.parent.name == "jury":
        _refuse_symlink(root.parent)
    verdicts = []
    if not root.is_dir():
        return verdicts
    case_dirs = sorted(p for p in root.iterdir()
                       if _CASE_DIR.fullmatch(p.name) and p.is_dir() and not p.is_symlink())
    for case_dir in case_dirs:
        files = sorted(p for p in case_dir.glob("*.pt") if p.is_file() and not p.is_symlink())
        entries = [torch.load(p, weights_only=True) for p in files]
        if len(entries) >= 2:
            verdicts.append(judge_case(case_dir.name, entries))
        if not keep:
            for p in files:
                p.unlink()
            _rmdir_if_empty(case_dir)
    if not keep:
        marker = root / MARKER
        if marker.is_file() and not marker.is_symlink():
            marker.unlink()
        _rmdir_if_empty(root)
        if root.parent.name == "jury":
            _rmdir_if_empty(root.parent)
    return verdicts


def _rmdir_if_empty(path: Path) -> None:
    with contextlib.suppress(OSError):  # not empty: it holds something that is not ours
        path.rmdir()


def write(verdicts: list[JuryVerdict], path: str | Path) -> None:
    with outdir.open_for_writing(path) as out:  # never through a symlink
        for v in verdicts:
            out.write(json.dumps(_jsonable(asdict(v))) + "\n")


def read(path: str | Path) -> list[JuryVerdict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [JuryVerdict(**json.loads(line)) for line in path.read_text().splitlines() if line]


def _jsonable(value):
    if isinstance(value, float) and value == float("inf"):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def section(verdicts: list[JuryVerdict]) -> str:
    """The report's jury section (empty when no case ran on more than one backend)."""
    if not verdicts:
        return ""
    rows = []  # labels, backends and findings may come from a jury.jsonl: all escaped
    for v in verdicts:
        distances = ", ".join(f"{md(b, code=True)} {_fmt(d)}" for b, d in v.to_reference.items())
        rows.append([md(v.label), md(v.kind), _fmt(v.allowed), distances,
                     md(v.outlier, code=True) if v.outlier else "–", md(v.finding)])
    flagged = sum(1 for v in verdicts if v.outlier or "disagrees" in v.finding)
    return ("## Jury\n\nBackends that ran the same case, compared on the same seeded query rows: "
            "max |output - reference| per backend, against the parity rule's tolerance. "
            f"{len(verdicts)} case(s), {flagged} with a disagreement.\n\n"
            + tabulate(rows, headers=["case", "reference", "allowed", "distance to reference",
                                      "outlier", "finding"], tablefmt="github",
                       disable_numparse=True))


def _fmt(x: float | None) -> str:
    return "inf" if x is None or x == float("inf") else f"{x:.3g}"
