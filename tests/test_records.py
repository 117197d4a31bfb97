"""results.jsonl: the versioned JSON Schema, the harness's own validator, and that they agree."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.case import Case
from harness.errors import RecordsError
from harness.results.records import (
    ANNOTATION_KEYWORDS,
    ENFORCED_KEYWORDS,
    SCHEMA_PATH,
    SCHEMA_VERSION,
    Record,
    load_schema,
    merge_records,
    read_records,
    record_from_dict,
    schema_errors,
    setup_labels,
)

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures" / "results"
SAMPLES = REPO / "reports" / "samples"


@pytest.fixture(scope="module")
def real_records() -> list[dict]:
    """Records of a real (tiny) run in this process: every check, a pass and a skip."""
    from harness.options import get_profile
    from harness.run.worker import Task, execute
    from harness.target import detect

    tiny = get_profile("quick")
    target = detect()
    out = []
    cases = [Case(batch=1, seqlen_q=8, heads_q=1, head_dim=8, dtype="float32", causal=True),
             Case(entry="varlen", batch=2, seqlens_q=(3, 5), seqlens_k=(4, 6), heads_q=1,
                  head_dim=8)]
    for case in cases:
        task = Task(suite="test", case=case, backend="sdpa-math",
                    checks=("fwd", "bwd", "determinism", "throughput"), profile=tiny.name)
        out += [json.loads(payload.to_json()) for kind, payload in execute(task, target, {})
                if kind == "record"]
    assert {r["status"] for r in out} >= {"pass", "skip"}
    assert any(r["check"] == "throughput" and r["status"] == "pass" for r in out)
    return out


def validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(load_schema())


def harness_ok(data) -> bool:
    try:
        record_from_dict(data, "x.jsonl:1")
    except RecordsError:
        return False
    return True


def schema_ok(data) -> bool:
    return validator().is_valid(data)


# ---------------------------------------------------------------------------- the schema


def test_schema_is_valid_versioned_and_shipped():
    schema = load_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["properties"]["schema"]["const"] == SCHEMA_VERSION
    assert schema["$id"].endswith(f":{SCHEMA_VERSION}")
    assert SCHEMA_PATH == REPO / "harness" / "results" / "schema" / "records.schema.json"
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"results/schema/*.json"' in pyproject


def _keywords(node, found: set[str]) -> set[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            found.add(key)
            if key == "properties" or key == "$defs":
                for sub in value.values():
                    _keywords(sub, found)
            elif key in ("allOf",):
                for sub in value:
                    _keywords(sub, found)
            elif key in ("if", "then", "additionalProperties", "items"):
                _keywords(value, found)
    return found


def test_schema_uses_only_keywords_the_harness_enforces():
    used = _keywords(load_schema(), set())
    assert used <= ENFORCED_KEYWORDS | ANNOTATION_KEYWORDS, used - ENFORCED_KEYWORDS


# ---------------------------------------------------------------------------- good records


def test_real_records_pass_both_validators(real_records):
    for data in real_records:
        assert not list(validator().iter_errors(data)), data
        assert isinstance(record_from_dict(data, "run:1"), Record)


def committed_files() -> list[Path]:
    return sorted(FIXTURES.glob("*.jsonl")) + sorted(SAMPLES.glob("**/results.jsonl"))


@pytest.mark.parametrize("path", committed_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_committed_result_files_follow_the_schema(path):
    records = read_records(path)
    assert records
    for line in path.read_text().splitlines():
        assert not list(validator().iter_errors(json.loads(line)))


def test_synthetic_fixtures_say_so_and_samples_do_not():
    for path in FIXTURES.glob("*.jsonl"):
        assert path.name.startswith("synthetic-")
        for r in read_records(path):
            assert r.target["extra"]["synthetic"] == "true"
    for path in SAMPLES.glob("**/results.jsonl"):
        for r in read_records(path):
            assert "synthetic" not in (r.target.get("extra") or {})


# ----------------------------------------------------------------------------- bad records

BAD = [
    # (what to do to a good record, the message the harness must give)
    (lambda d: d.pop("status"), "missing field 'status' (is this an attn-harness results.jsonl?)"),
    (lambda d: d.update(status="passed"), "field 'status' is 'passed', not one of pass, fail"),
    (lambda d: d.update(check="speed"), "field 'check' is 'speed', not one of fwd, bwd"),
    (lambda d: d.update(schema=2), "field 'schema' is 2, not 1: this file was written by another"),
    (lambda d: d.update(schema=True), "field 'schema' must be an integer, got boolean"),
    (lambda d: d.update(seed="0"), "field 'seed' must be an integer, got string"),
    (lambda d: d.update(reason=None), "field 'reason' must be a string, got null"),
    (lambda d: d.update(case_id="XYZ"), "field 'case_id' is 'XYZ', which does not match"),
    (lambda d: d.update(metrics=[]), "field 'metrics' must be an object, got array"),
    (lambda d: d.update(extra_field=1), "unknown field 'extra_field'"),
    (lambda d: d["backend"].pop("name"), "field 'backend' has no 'name'"),
    (lambda d: d["backend"].update(name=""), "field 'backend.name' must not be empty"),
    (lambda d: d["target"].pop("target_id"), "field 'target' has no 'target_id'"),
    (lambda d: d["target"].update(vendor="intel"), "field 'target.vendor' is 'intel', not one of"),
    (lambda d: d["metrics"].update(ratio=-1.0), "field 'metrics.ratio' is -1.0, must be >= 0"),
    (lambda d: d["metrics"].update(ratio="1.2"), "field 'metrics.ratio' must be a number or null"),
]


def throughput_of(records: list[dict]) -> dict:
    return copy.deepcopy(next(r for r in records
                              if r["check"] == "throughput" and r["status"] == "pass"))


@pytest.mark.parametrize(("mutate", "message"), BAD)
def test_bad_records_are_refused_by_both_with_one_line_naming_file_line_and_field(
        real_records, mutate, message):
    data = copy.deepcopy(real_records[0])
    mutate(data)
    assert not schema_ok(data)
    with pytest.raises(RecordsError) as info:
        record_from_dict(data, "results.jsonl:7")
    text = str(info.value)
    assert text.startswith("results.jsonl:7: ") and message in text and "\n" not in text


@pytest.mark.parametrize(("path", "value", "message"), [
    (("metrics", "time_ms"), None, "field 'metrics' has no 'time_ms'"),
    (("metrics", "time_ms"), 0.0, "field 'metrics.time_ms' is 0.0, must be > 0"),
    (("metrics", "bwd", "tflops"), None, "field 'metrics.bwd' has no 'tflops'"),
    (("metrics", "timing_reps"), 0, "field 'metrics.timing_reps' is 0, must be >= 1"),
])
def test_throughput_records_need_their_numbers(real_records, path, value, message):
    data = throughput_of(real_records)
    node = data
    for key in path[:-1]:
        node = node[key]
    if value is None:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    assert not schema_ok(data)
    with pytest.raises(RecordsError, match=message.replace(".", r"\.")):
        record_from_dict(data, "r:1")


def test_a_skipped_throughput_record_needs_no_numbers(real_records):
    data = throughput_of(real_records)
    data.update(status="skip", metrics={}, reason="not run")
    assert schema_ok(data) and harness_ok(data)


JSON = st.recursive(st.none() | st.booleans() | st.integers(-3, 3) | st.floats(-2, 2)
                    | st.sampled_from(["", "pass", "fwd", "x", "0123456789ab"]),
                    lambda inner: st.lists(inner, max_size=2)
                    | st.dictionaries(st.sampled_from(["name", "target_id", "ratio", "time_ms",
                                                       "tflops", "a"]), inner, max_size=2),
                    max_leaves=4)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_both_validators_agree_on_random_mutations(real_records, data):
    record = copy.deepcopy(data.draw(st.sampled_from(real_records)))
    node = record
    for _ in range(data.draw(st.integers(0, 2))):
        keys = [k for k, v in node.items() if isinstance(v, dict)] if isinstance(node, dict) else []
        if not keys:
            break
        node = node[data.draw(st.sampled_from(sorted(keys)))]
    action = data.draw(st.sampled_from(["replace", "delete", "add"]))
    if action == "replace" and node:
        node[data.draw(st.sampled_from(sorted(node)))] = data.draw(JSON)
    elif action == "delete" and node:
        del node[data.draw(st.sampled_from(sorted(node)))]
    else:
        node[data.draw(st.sampled_from(["status", "check", "bogus", "time_ms", "name"]))] = \
            data.draw(JSON)
    assert schema_ok(record) == harness_ok(record), list(schema_errors(record, load_schema()))


def test_a_non_object_line_is_refused(real_records):
    for value in ([], 3, "x", None):
        assert not schema_ok(value)
        with pytest.raises(RecordsError, match="^f:2: a record must be a JSON object$"):
            record_from_dict(value, "f:2")


# ------------------------------------------------------------------------------ read_records


def write_lines(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "results.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_read_records_names_the_line_of_a_bad_one(tmp_path, real_records):
    good = json.dumps(real_records[0])
    path = write_lines(tmp_path, [good, "", "{not json"])
    with pytest.raises(RecordsError, match=rf"^{path}:3: not JSON"):
        read_records(path)
    nan = good.replace('"schema": 1', '"schema": NaN')
    with pytest.raises(RecordsError, match=rf"^{path}:1: not JSON \(NaN is not JSON\)"):
        read_records(write_lines(tmp_path, [nan]))


def test_read_records_checks_the_case_beyond_the_schema(tmp_path, real_records):
    data = copy.deepcopy(real_records[0])
    data["case"]["heads_kv"] = 3
    data["case"]["heads_q"] = 4
    path = write_lines(tmp_path, [json.dumps(real_records[0]), json.dumps(data)])
    assert schema_ok(data)
    with pytest.raises(RecordsError, match=rf"^{path}:2: field 'case': .*heads_q=4 is not a "
                                           "multiple of heads_kv=3"):
        read_records(path)


def test_read_records_on_a_missing_file(tmp_path):
    with pytest.raises(RecordsError, match="cannot read it"):
        read_records(tmp_path / "nope.jsonl")


# ---------------------------------------------------------------------------------- merging


def test_merge_keeps_the_later_record_and_counts_the_replaced(real_records):
    first = [record_from_dict(d, "a") for d in real_records]
    later = [record_from_dict({**d, "reason": "later"}, "b") for d in real_records]
    kept, superseded = merge_records(first + later)
    assert len(kept) == len(first) and superseded == len(first)
    assert all(r.reason == "later" for r in kept)


def test_setups_of_one_target_are_told_apart_by_what_differs():
    base = {"target_id": "rocm6.2-gfx942-mi300x", "vendor": "amd", "torch": "2.5.1"}
    ck = {**base, "flash_attn_flavor": "rocm-ck"}
    triton = {**base, "flash_attn_flavor": "rocm-triton"}
    cpu = {"target_id": "cpu-x86_64", "vendor": "cpu"}
    labels = sorted(setup_labels([ck, triton, cpu, ck]).values())
    assert labels == ["cpu-x86_64", "rocm6.2-gfx942-mi300x (flash-attn rocm-ck)",
                      "rocm6.2-gfx942-mi300x (flash-attn rocm-triton)"]


def test_the_key_of_a_record_includes_the_backend_flavor(real_records):
    r = record_from_dict(real_records[0], "a")
    other = record_from_dict({**real_records[0], "backend": {**real_records[0]["backend"],
                                                              "flavor": "other"}}, "a")
    assert r.key != other.key and r.key[:2] == other.key[:2]
