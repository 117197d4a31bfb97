"""pytest plugin: parity suites as tests (registered through the ``pytest11`` entry point).

Importing this module must stay cheap: torch and the harness's heavy modules are imported inside
hooks and fixtures only.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import options

GROUP = "attn-harness"


def pytest_addoption(parser) -> None:
    group = parser.getgroup(GROUP, "attention kernel parity (attn-harness)")
    add = group.addoption
    add("--attn-backend", action="append", default=None, metavar="NAME|FILE.py:FUNC",
        help="backend the parity suites test, repeatable (default: every backend available here)")
    add("--attn-suite", action="append", default=None, metavar="NAME|FILE.toml",
        help="case suite by name (cases/NAME.toml) or path, repeatable (default: smoke)")
    add("--attn-profile", type=options.profile, default="quick", metavar="quick|nightly|exhaustive",
        help="effort per check, exploration examples and cost budget (default: quick)")
    add("--attn-checks", type=options.checks, default=("fwd", "bwd", "determinism"), metavar="LIST",
        help="comma-separated checks (default: fwd,bwd,determinism)")
    add("--attn-seed", type=int, default=0, metavar="N",
        help="seed of inputs, dropout draws and hypothesis (default: 0)")
    add("--attn-examples", type=options.count, default=None, metavar="N",
        help="hypothesis-generated cases per backend in test_explore (default: the profile's, "
             "20 for quick)")
    add("--attn-timeout", type=options.positive, default=None, metavar="S",
        help="seconds one check may run before it is a timeout (default: the profile's, 300 "
             "for quick)")
    add("--attn-max-gflop", type=options.non_negative, default=None, metavar="N",
        help="skip checks above N GFLOP per pass, recording why; 0 = no limit (default: 2 on a "
             "CPU, no limit on a GPU)")
    add("--attn-audit", action="store_true", default=False,
        help="also run cases a backend does not claim and classify how it treats them "
             "(default: off)")
    add("--attn-records", default=None, metavar="DIR",
        help="write DIR/results.jsonl and DIR/report.md from this session (default: none)")
    add("--attn-regressions", default="cases/regressions", metavar="DIR",
        help="where minimal failing cases found by exploration are written (default: "
             "cases/regressions)")


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "attn_parity: a parity test driven by the --attn- options")
    from harness.explore import register_profiles

    register_profiles()  # attn-quick, attn-nightly, attn-exhaustive: --hypothesis-profile
    specs = config.getoption("--attn-backend") or []
    problems = [msg for msg in map(_static_backend_problem, specs) if msg]
    if problems:
        raise pytest.UsageError(problems[0])
    try:
        from harness.suites import iter_cases

        config._attn_cases = iter_cases(config.getoption("--attn-suite") or ["smoke"])
    except Exception as exc:  # noqa: BLE001 - HarnessError: bad case file
        raise pytest.UsageError(f"--attn-suite: {exc}") from None
    config._attn_session = None


def _static_backend_problem(spec: str) -> str:
    """What can be said about a backend spec without importing anything heavy."""
    from harness.backends import BUILTIN, entry_point_names
    from harness.backends.user import is_file_spec

    if spec in BUILTIN or spec in entry_point_names():
        return ""
    if is_file_spec(spec):
        path = spec.rpartition(":")[0]
        return "" if Path(path).is_file() else f"--attn-backend {spec}: no such file {path}"
    known = ", ".join([*BUILTIN, *entry_point_names()])
    return f"--attn-backend {spec}: unknown backend (known: {known}; or FILE.py:FUNC)"


def session(config):
    """The session's :class:`harness.parity.ParitySession`, started on first use."""
    if config._attn_session is None:
        from harness.parity import ParitySession

        config._attn_session = ParitySession.from_config(config)
    return config._attn_session


def pytest_generate_tests(metafunc) -> None:
    if "attn_backend" in metafunc.fixturenames:
        specs = session(metafunc.config).backends
        metafunc.parametrize("attn_backend", specs, ids=specs, scope="session")
    if "attn_case" in metafunc.fixturenames:
        cases = metafunc.config._attn_cases
        ids = [f"{suite}:{case.name or case.label}:{case.case_id}".replace(" ", "_")
               for suite, case in cases]
        metafunc.parametrize("attn_case", cases, ids=ids)


@pytest.fixture(scope="session")
def attn(request):
    """The parity session: runs cases on backends in an isolated worker process."""
    return session(request.config)


def pytest_sessionfinish(session, exitstatus) -> None:
    state = getattr(session.config, "_attn_session", None)
    if state is not None:
        state.close()
    if not hasattr(session.config, "workerinput"):  # the xdist controller, or no xdist
        directory = session.config.getoption("--attn-records")
        if directory and Path(directory).is_dir():
            from harness.parity import write_report

            write_report(Path(directory))


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    state = getattr(config, "_attn_session", None)
    directory = config.getoption("--attn-records")
    lines = state.summary_lines() if state is not None else []
    if directory and Path(directory, "report.md").exists():
        lines.append(f"report: {Path(directory, 'report.md')}")
    if lines:
        terminalreporter.section("attn-harness")
        for line in lines:
            terminalreporter.write_line(line)


# ------------------------------------------------------- several GPUs: one per xdist worker
# Kept apart from the parity hooks: `pytest -n N` pins xdist worker gwI to the I-th visible GPU
# (CUDA_VISIBLE_DEVICES / HIP_VISIBLE_DEVICES, see harness.devices) in the earliest hook a
# plugin gets, before any conftest or test module can start a GPU runtime.


def pytest_load_initial_conftests(early_config, parser, args) -> None:
    from harness.devices import pin_xdist_worker
    from harness.errors import HarnessError

    try:
        early_config._attn_pinned = pin_xdist_worker()
    except HarnessError as exc:
        raise pytest.UsageError(str(exc)) from None


def pytest_report_header(config) -> list[str]:
    pinned = getattr(config, "_attn_pinned", "")
    return [f"attn-harness: {pinned}"] if pinned else []
