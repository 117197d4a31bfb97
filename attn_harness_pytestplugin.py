"""attn-harness's pytest plugin (the ``pytest11`` entry point): hooks only, inert until asked.

Like Hypothesis's ``_hypothesis_pytestplugin``, this is a top-level module apart from the
``harness`` package; the run options and their parsers live in the library
(:mod:`harness.options`, which imports nothing heavy) and this module only wires them into
pytest. Loading it registers the ``--attn-*`` options, the ``attn_parity`` marker and the
fixtures, and imports neither torch nor hypothesis. Everything else (checking options, reading
suites, starting a worker, pinning GPUs under ``pytest -n``) happens only in a session that asks
for it: one given an ``--attn-*`` option, or with a test that uses the plugin's fixtures
(``attn``, ``attn_backend``, ``attn_case``).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest  # noqa: TID253 - the plugin runs inside pytest

from harness.errors import HarnessError
from harness.options import OPTIONS, PREFIX, add_options, option_values

GROUP = "attn-harness"


# ------------------------------------------------------------------------- pytest hooks


def pytest_addoption(parser) -> None:
    group = parser.getgroup(GROUP, "attention kernel parity (attn-harness)")
    add_options(group.addoption, PREFIX)


def _given(config) -> list[str]:
    """The ``--attn-*`` options given a value other than their default."""
    return [f"--{PREFIX}{opt.name}" for opt in OPTIONS
            if config.getoption(opt.dest(PREFIX)) != (False if opt.flag else opt.default)]


def _state(config) -> dict[str, Any]:
    key = _STATE_KEY
    if key not in config.stash:
        config.stash[key] = {"active": False, "session": None}
    return config.stash[key]


_STATE_KEY = pytest.StashKey[dict]()


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "attn_parity: a parity test driven by the --attn- options")
    if _given(config):
        _activate(config)


def _activate(config) -> None:
    """Turn the plugin on: validate the options (one-line usage errors) and register the
    hypothesis profiles. Runs once per session."""
    state = _state(config)
    if state["active"]:
        return
    state["active"] = True
    from harness.run.session import validate_options  # noqa: PLC0415 - the plugin starts light

    try:
        state["options"] = validate_options(option_values(config.getoption, PREFIX),
                                            where="--attn-")
    except HarnessError as exc:
        raise pytest.UsageError(str(exc)) from None
    from harness.run.explore import register_profiles

    register_profiles()  # attn-quick, attn-nightly, attn-exhaustive: --hypothesis-profile


def _session(config):
    """The session's :class:`harness.run.session.PytestSession`, started on first use; None
    when it cannot start (e.g. FILE.py:FUNC without FUNC, which only the worker's import can
    tell): the reason is kept and becomes a usage error once collection ends, since an exit
    raised while a module is collected reads as a collection error with a traceback."""
    _activate(config)
    state = _state(config)
    if state["session"] is None and not state.get("error"):
        from harness.run.session import PytestSession  # noqa: PLC0415 - the plugin starts light

        try:
            given = getattr(config, "workerinput", {})
            state["session"] = PytestSession(state["options"], worker_id=given.get("workerid"),
                                             started_stamp=given.get(_STAMP, _stamp(config)))
        except HarnessError as exc:
            state["error"] = str(exc)
    return state["session"]


def pytest_generate_tests(metafunc) -> None:
    names = metafunc.fixturenames
    if "attn_backend" not in names and "attn_case" not in names:
        return
    session = _session(metafunc.config)
    if session is None:
        return
    if "attn_backend" in names:
        metafunc.parametrize("attn_backend", session.backends, ids=session.backends,
                             scope="session")
    if "attn_case" in names:
        cases = session.suite_cases()
        ids = [f"{suite}:{case.name or case.label}:{case.case_id}".replace(" ", "_")
               for suite, case in cases]
        metafunc.parametrize("attn_case", cases, ids=ids)


_STAMP = "attn_harness_run_stamp"


def _stamp(config) -> str:
    """This session's start (UTC, ``YYYYMMDD-HHMMSS``): the name of the run folder it writes to
    (``harness.results.storage``). Formatted here so that no harness module is imported."""
    state = _state(config)
    if "stamp" not in state:
        state["started_at"] = time.time()
        state["stamp"] = time.strftime("%Y%m%d-%H%M%S", time.gmtime(state["started_at"]))
    return state["stamp"]


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:
    """pytest-xdist, in the controller: each worker gets the session's start stamp, so all of
    them write to one run folder."""
    node.workerinput[_STAMP] = _stamp(node.config)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(session, config, items) -> None:
    """After collection (and after pytest's own reordering: trylast):

    * a session that could not start is a usage error now (one line, exit 4: see
      :func:`_session`);
    * under ``--attn-shard``, the case tests outside this share are deselected (exploration
      tests stay: each shard explores its own part);
    * every suite case runs first and exploration after all of them: pytest groups items by
      the session-scoped ``attn_backend`` parameter, which put each backend's exploration
      (minutes) after a single case, and a user's first failure from the cheap cases must come
      early. Other tests keep their order.
    """
    state = config.stash.get(_STATE_KEY, None)
    if state and state.get("error"):
        raise pytest.UsageError(state["error"])
    if state and state.get("session") is not None and state["options"].shard is not None:
        session_ = state["session"]
        kept, dropped = [], []
        for item in items:
            params = getattr(getattr(item, "callspec", None), "params", {})
            if "attn_case" in params and "attn_backend" in params and not session_.in_share(
                    params["attn_case"][1], params["attn_backend"]):
                dropped.append(item)
            else:
                kept.append(item)
        if dropped:
            config.hook.pytest_deselected(items=dropped)
            items[:] = kept

    def exploring(item) -> bool:
        names = getattr(item, "fixturenames", ())
        return "attn_backend" in names and "attn_case" not in names

    later = [item for item in items if exploring(item)]
    if later and len(later) < len(items):
        items[:] = [item for item in items if not exploring(item)] + later


@pytest.fixture(scope="session")
def attn(request):
    """The parity session: runs cases on backends in an isolated worker process."""
    session = _session(request.config)
    if session is None:
        raise pytest.UsageError(_state(request.config)["error"])
    return session


#: What an xdist worker tells the controller (``workeroutput``): the run folder it wrote to.
_RUN_DIR = "attn_harness_run_dir"


def pytest_sessionfinish(session, exitstatus) -> None:
    config = session.config
    state = config.stash.get(_STATE_KEY, None)
    worker = hasattr(config, "workerinput")
    if state and state.get("session") is not None:
        state["session"].close(controller=not worker)
        if worker and state["session"].out is not None:
            config.workeroutput[_RUN_DIR] = str(state["session"].out)
    elif state and not worker and state.get("worker_runs"):
        # `pytest -n N`: the workers ran the tests and wrote their records; the controller,
        # which holds no session of its own, renders the run's report over all of them.
        from harness.run.session import report_from_files  # noqa: PLC0415 - the plugin starts light

        state["reports"] = [report for out in sorted(state["worker_runs"])
                            if (report := report_from_files(Path(out),
                                                            since=state["started_at"]))]


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    """pytest-xdist, in the controller: note the run folder each worker wrote to."""
    out = getattr(node, "workeroutput", {}).get(_RUN_DIR)
    if out:
        _state(node.config).setdefault("worker_runs", set()).add(out)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    state = config.stash.get(_STATE_KEY, None)
    if state and state.get("reports"):
        terminalreporter.section("attn-harness")
        for report in state["reports"]:
            terminalreporter.write_line(f"report: {report}")
    if not state or state.get("session") is None:
        return
    lines = state["session"].summary_lines()
    if lines:
        terminalreporter.section("attn-harness")
        for line in lines:
            terminalreporter.write_line(line)


# ------------------------------------------------------- several GPUs: one per xdist worker
# `pytest -n N` pins xdist worker gwI to the I-th visible GPU (CUDA_VISIBLE_DEVICES /
# HIP_VISIBLE_DEVICES, see harness.run.devices) in the earliest hook a plugin gets, before any
# conftest or test module can start a GPU runtime -- but only in a session that gives an
# --attn-* option: an unrelated project's `pytest -n` keeps its environment.


def pytest_load_initial_conftests(early_config, parser, args) -> None:
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    if not any(str(a).startswith(f"--{PREFIX}") for a in args):
        return
    from harness.run.devices import pin_xdist_worker  # noqa: PLC0415 - the plugin starts light

    try:
        early_config.stash[_PINNED_KEY] = pin_xdist_worker()
    except HarnessError as exc:
        raise pytest.UsageError(str(exc)) from None


_PINNED_KEY = pytest.StashKey[str]()


def pytest_report_header(config) -> list[str]:
    lines = []
    pinned = config.stash.get(_PINNED_KEY, "")
    if pinned:
        lines.append(f"attn-harness: {pinned}")
    args = [str(a) for a in config.invocation_params.args]
    for opt in OPTIONS:
        if opt.alias and any(a.split("=")[0] == f"--{PREFIX}{opt.alias}" for a in args):
            lines.append(f"attn-harness: --{PREFIX}{opt.alias} is deprecated and will be removed "
                         f"in the next release; use --{PREFIX}{opt.name}")
    return lines
