"""Exact dropout judging (harness/exact/dropout.py): D(P) recovered from seeded calls with identity
V blocks, judged entry by entry, and the backward judged with the forward's mask. The kernels
are the dropout zoo (tests/zoo/dropout_kernels.py) and SDPA's math backend on the CPU."""

from __future__ import annotations

import json

import pytest
import torch

from harness.backends.sdpa import SdpaBackend
from harness.backends.user import FunctionBackend
from harness.case import Case
from harness.exact import dropout, judge, reference
from harness.exact.inputs import make_inputs
from harness.exact.outputs import Outputs
from tests.zoo import dropout_kernels, kernels

SEED = 1234
OTHER = 99

BASE = dict(batch=2, seqlen_q=24, seqlen_k=40, heads_q=4, heads_kv=2, head_dim=16,
            dropout_p=0.17, dtype="float16")


def seeded(forward, inputs, seed=SEED):
    """``call(v)``: the kernel's output with v replaced, after ``torch.manual_seed(seed)``."""

    def call(v):
        torch.manual_seed(seed)
        return forward(dropout.with_values(inputs, v)).out

    return call


def seeded_backward(forward, inputs, seed=SEED) -> Outputs:
    """One seeded forward+backward, as the lead's ``call_backward``."""
    leaves = inputs.with_grad()
    torch.manual_seed(seed)
    out = forward(leaves).out
    dq, dk, dv = torch.autograd.grad(out, (leaves.q, leaves.k, leaves.v), inputs.dout)
    return Outputs(out=out.detach(), dq=dq, dk=dk, dv=dv)


def judge_kernel(forward, case):
    """(recovery, fwd verdict, bwd verdict) of a kernel on a case."""
    inputs = make_inputs(case, "cpu", 0)
    recovery = dropout.recover(seeded(forward, inputs), inputs, seeded(forward, inputs, OTHER))
    assert recovery.seeded, recovery.reason
    fwd = dropout.judge_forward(recovery, inputs)
    keep = dropout.keep_masks(recovery, inputs)
    bwd = dropout.judge_backward(keep, inputs, seeded_backward(forward, inputs),
                                 calls=recovery.calls + 1)
    return recovery, fwd, bwd


def zoo(name):
    return FunctionBackend(name, getattr(dropout_kernels, name)).forward


CORRECT_CASES = {
    "plain-f16": {},
    "causal-bf16": dict(dtype="bfloat16", causal=True),
    "window-alibi-f32": dict(dtype="float32", window=(5, 3), alibi=True),
    "softcap-scale-f16": dict(softcap=2.0, scale=0.4),
    "rows-without-keys": dict(seqlen_q=40, seqlen_k=24, causal=True, heads_kv=4),
    "mqa-long-keys": dict(heads_kv=1, seqlen_k=70, dropout_p=0.3),
    "strided": dict(layout="strided"),
    "packed-kv": dict(layout="packed-kv"),
    "v-transposed": dict(layout="v-transposed", dtype="bfloat16"),
    "alibi-per-batch": dict(alibi=True, alibi_slopes="random-per-batch"),
}


@pytest.mark.parametrize("name", sorted(CORRECT_CASES))
def test_a_correct_seeded_dropout_passes_exactly(name):
    case = Case(**{**BASE, **CORRECT_CASES[name]})
    recovery, fwd, bwd = judge_kernel(zoo("correct"), case)
    assert fwd.status == "pass", fwd.reason
    assert bwd.status == "pass", bwd.reason
    d = fwd.metrics["dropout"]
    assert d["exact"] is True and d["seed_dependent"] is True
    assert d["keep_rate_tested"] and abs(d["keep_z"]) < dropout.KEEP_SIGMAS
    assert d["head_pairs"] > 0 and d["batch_pairs"] > 0  # the distinctness tests had power
    assert recovery.calls == -(-case.seqlen_k // case.head_dim) + 3
    assert bwd.metrics["dropout"]["exact"] is True
    json.dumps([fwd.metrics, bwd.metrics], allow_nan=False)  # records are strict JSON
    if case.rows_without_keys:
        for piece_d in recovery.d:  # rows without keys read back as exactly zero
            assert piece_d[:, :, : case.seqlen_q - case.seqlen_k].abs().max() == 0


@pytest.mark.parametrize("name", sorted(set(dropout_kernels.ZOO) - {"unseeded"}))
def test_every_dropout_bug_is_caught_by_its_check(name):
    case = Case(**BASE)
    _, fwd, bwd = judge_kernel(zoo(name), case)
    verdict = {"fwd": fwd, "bwd": bwd}[dropout_kernels.ZOO[name]]
    assert verdict.status == "fail", (name, verdict.metrics)
    assert verdict.reason
    if name == "backward_new_mask":  # its forward is right: only the backward shows it
        assert fwd.status == "pass", fwd.reason
        assert "mask the forward used" in bwd.reason


def test_the_reasons_name_the_defect():
    case = Case(**BASE)
    reasons = {name: judge_kernel(zoo(name), case)[1].reason
               for name in ("heads_share_mask", "group_shares_mask", "batch_shares_mask",
                            "unscaled", "keep_rate_off", "fixed_seed")}
    assert "pairs of heads share one dropout mask" in reasons["heads_share_mask"]
    assert "(one GQA group)" in reasons["group_shares_mask"]
    assert "pairs of batch entries" in reasons["batch_shares_mask"]
    assert "neither 0 nor P/(1-p)" in reasons["unscaled"]
    assert "wrong drop probability" in reasons["keep_rate_off"]
    assert "does not depend on the seed" in reasons["fixed_seed"]


def test_where_the_plain_baseline_overflows_the_widened_one_is_the_yardstick():
    """fp16 scores of |q . k| * scale ~ 1e5 overflow the plain baseline (NaN P); the zoo kernel
    computes in float32 and passes against flash-attn's precision split; NaN output fails."""
    case = Case(**{**BASE, "heads_kv": 4})
    inputs = make_inputs(case, "cpu", 0)
    inputs.q, inputs.k = inputs.q * 200, inputs.k * 200
    assert not torch.isfinite(dropout.baseline_dropped(inputs)[0]).all()
    forward = zoo("correct")
    recovery = dropout.recover(seeded(forward, inputs), inputs)
    fwd = dropout.judge_forward(recovery, inputs)
    assert fwd.status == "pass", fwd.reason
    assert fwd.metrics["dropout"]["widened_yardstick"] is True
    keep = dropout.keep_masks(recovery, inputs)
    bwd = dropout.judge_backward(keep, inputs, seeded_backward(forward, inputs))
    assert bwd.status == "pass", bwd.reason
    assert bwd.metrics["dropout"]["widened_yardstick"] is True
    broken = dropout.Recovery(True, recovery.calls, [d.clone() for d in recovery.d])
    broken.d[0][0, 0, 0, 0] = float("nan")
    nan = dropout.judge_forward(broken, inputs)
    assert nan.status == "fail" and "NaN/Inf" in nan.reason


def test_sub_tests_without_power_are_named_not_passed_silently():
    """One key per row: P = 1 everywhere, but 2 x 2 entries cannot show a keep rate."""
    case = Case(batch=2, seqlen_q=2, seqlen_k=1, heads_q=2, head_dim=16, dropout_p=0.17,
                dtype="float32")
    _, fwd, _ = judge_kernel(zoo("correct"), case)
    assert fwd.status == "pass"
    assert "too few unambiguous entries" in fwd.reason and "keep rate" in fwd.reason
    assert "across heads" in fwd.reason and "across batch entries" in fwd.reason
    assert fwd.metrics["dropout"]["untested"]


def test_a_kernel_whose_dropout_ignores_the_seed_falls_back_to_statistics():
    inputs = make_inputs(Case(**BASE), "cpu", 0)
    forward = zoo("unseeded")
    recovery = dropout.recover(seeded(forward, inputs), inputs)
    assert not recovery.seeded and recovery.calls == 2 and recovery.differing > 0
    assert "not a function of the seed" in recovery.reason
    with pytest.raises(ValueError):
        dropout.judge_forward(recovery, inputs)
    statistical = judge.Verdict("fwd", "pass", {"dropout": {"out": {}}, "statistical": True})
    marked = dropout.mark_statistical(statistical, recovery.reason)
    assert marked.metrics["dropout"]["exact"] is False
    assert marked.metrics["dropout"]["out"] == {}
    assert marked.reason.startswith("judged statistically: two calls")


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_sdpa_math_on_the_cpu_is_seed_determined_and_exact(dtype):
    """Recorded finding: SDPA's math backend draws its mask from the global RNG (bernoulli on
    the probabilities), identically with and without grad, so it is judged exactly."""
    backend = SdpaBackend("sdpa-math", device_type="cpu")
    case = Case(**{**BASE, "dtype": dtype, "causal": True})
    _, fwd, bwd = judge_kernel(backend.forward, case)
    assert fwd.status == "pass", fwd.reason
    assert bwd.status == "pass", bwd.reason


def test_the_flash_style_zoo_kernel_is_exact_too():
    """tests/zoo/kernels.py's ``correct`` drops with torch.rand per key block; autograd keeps
    the mask, so its backward matches its forward."""
    _, fwd, bwd = judge_kernel(FunctionBackend("correct", kernels.correct).forward,
                               Case(**{**BASE, "seqlen_k": 130}))
    assert fwd.status == "pass", fwd.reason
    assert bwd.status == "pass", bwd.reason


# ------------------------------------------------------------------------------------ varlen


def varlen_forward(func, reseed: bool = False):
    """A varlen kernel from a dense one: each sequence on its own (``reseed``: the RNG is reset
    to one seed drawn per call before every sequence, so all sequences share one mask)."""

    def forward(inputs):
        case = inputs.case
        outs = []
        seed = int(torch.randint(0, 2**62, (1,)))
        for piece in inputs.sequences():
            q, k, v = (piece.q_like(inputs.q), piece.kv_like(inputs.k), piece.kv_like(inputs.v))
            if reseed:
                torch.manual_seed(seed)
            if q.shape[1] == 0:
                continue
            if k.shape[1] == 0:
                outs.append(torch.zeros_like(q[0]))
                continue
            outs.append(func(q, k, v, dropout_p=case.dropout_p, causal=case.causal)[0])
        return Outputs(out=torch.cat(outs))

    return forward


VARLEN = dict(entry="varlen", batch=3, seqlens_q=(20, 0, 17), seqlens_k=(33, 12, 40),
              heads_q=4, heads_kv=2, head_dim=16, dropout_p=0.2, dtype="bfloat16", causal=True)


def test_varlen_is_recovered_and_judged_per_sequence():
    case = Case(**VARLEN)
    recovery, fwd, bwd = judge_kernel(varlen_forward(dropout_kernels.correct), case)
    assert [tuple(d.shape) for d in recovery.d] == [(1, 4, 20, 33), (1, 4, 0, 12), (1, 4, 17, 40)]
    assert fwd.status == "pass", fwd.reason
    assert bwd.status == "pass", bwd.reason
    assert fwd.metrics["dropout"]["batch_pairs"] > 0


def test_varlen_sequences_sharing_a_mask_are_caught():
    # equal key lengths: the zoo's mask of a shorter sequence is then a leading block of the
    # longer one's
    case = Case(**{**VARLEN, "seqlens_q": (20, 30, 17), "seqlens_k": (33, 33, 33)})
    forward = varlen_forward(dropout_kernels.correct, reseed=True)
    _, fwd, _ = judge_kernel(forward, case)
    assert fwd.status == "fail" and "pairs of batch entries" in fwd.reason


def test_a_varlen_backward_with_another_mask_is_caught():
    _, fwd, bwd = judge_kernel(varlen_forward(dropout_kernels.backward_new_mask), Case(**VARLEN))
    assert fwd.status == "pass" and bwd.status == "fail"


# ------------------------------------------------------------------------- the references


GRAD_CASES = {
    "dense": dict(causal=True, softcap=3.0),
    "alibi-window": dict(alibi=True, window=(4, 2), heads_kv=4),
    "varlen": dict(entry="varlen", seqlen_q=0, seqlen_k=0, seqlens_q=(5, 9), seqlens_k=(11, 0),
                   causal=True),
}


@pytest.mark.parametrize("name", sorted(GRAD_CASES))
def test_reference_gradients_without_drops_equal_the_exact_reference(name):
    case = Case(**{**BASE, "dtype": "float32", "dropout_p": 0.0, **GRAD_CASES[name]})
    inputs = make_inputs(case, "cpu", 3)
    keep = [torch.ones(d.shape, dtype=torch.bool)
            for d in dropout.reference_probabilities(inputs)]
    ours = dropout.reference_gradients(inputs, keep)
    exact = reference.reference(inputs, grads=True)
    for name_ in ("out", "dq", "dk", "dv"):
        torch.testing.assert_close(getattr(ours, name_), getattr(exact, name_), rtol=0,
                                   atol=1e-12)


@pytest.mark.parametrize("name", sorted(GRAD_CASES))
def test_reference_gradients_with_a_mask_equal_autograd_in_float64(name):
    """The explicit formulas (dS = P * (dD * M / (1-p) - delta), ...) against autograd of the
    plain math with the mask fixed (the baseline's code path run in float64)."""
    case = Case(**{**BASE, "dtype": "float32", **GRAD_CASES[name]})
    inputs = make_inputs(case, "cpu", 3)
    for attr in ("q", "k", "v", "dout"):
        setattr(inputs, attr, getattr(inputs, attr).double())
    gen = torch.Generator().manual_seed(5)
    keep = [torch.rand(d.shape, generator=gen) >= case.dropout_p
            for d in dropout.reference_probabilities(inputs)]
    ours = dropout.reference_gradients(inputs, keep)
    autograd = dropout.baseline_gradients(inputs, keep)
    for name_ in ("out", "dq", "dk", "dv"):
        torch.testing.assert_close(getattr(ours, name_), getattr(autograd, name_), rtol=0,
                                   atol=1e-12)


# ----------------------------------------------------------------------------------- costs


def test_cost_and_the_limits_of_the_exact_judge():
    smoke = Case(batch=1, seqlen_q=64, seqlen_k=96, heads_q=2, head_dim=32, dropout_p=0.17,
                 dtype="float32")
    assert dropout.exact_cost(smoke) == (3 + 3, 2 * 64 * 96)
    assert dropout.exact_refusal(smoke) == ""
    many_keys = smoke.replace(seqlen_k=4096)
    assert "kernel calls" in dropout.exact_refusal(many_keys)
    big = smoke.replace(batch=64, heads_q=16, seqlen_q=128, seqlen_k=128, head_dim=128)
    assert "limits" in dropout.exact_refusal(big)
    assert dropout.exact_refusal(smoke.replace(dropout_p=0.0)) == "the case has no dropout"


def test_a_smoke_sized_case_costs_a_few_calls():
    case = Case(batch=1, seqlen_q=64, seqlen_k=96, heads_q=2, head_dim=32, dropout_p=0.17,
                dtype="float32")
    recovery, fwd, bwd = judge_kernel(SdpaBackend("sdpa-math", device_type="cpu").forward, case)
    assert recovery.calls == 6 and fwd.status == bwd.status == "pass"


@pytest.mark.parametrize("layout", ["strided", "packed-kv", "v-transposed"])
def test_with_values_keeps_the_geometry_of_v(layout):
    inputs = make_inputs(Case(**{**BASE, "layout": layout}), "cpu", 0)
    v = dropout.identity_values(inputs, 0)
    copy = dropout.with_values(inputs, v)
    assert copy.v.stride() == inputs.v.stride() and torch.equal(copy.v, v)
    assert torch.equal(copy.k, inputs.k)  # a packed k beside it is untouched
    if layout == "packed-kv":
        assert copy.k.untyped_storage().data_ptr() == copy.v.untyped_storage().data_ptr()
    assert torch.equal(inputs.v, make_inputs(inputs.case, "cpu", 0).v)  # the original too


def test_identity_values_hold_one_unit_vector_per_key_of_the_block():
    inputs = make_inputs(Case(**VARLEN), "cpu", 0)
    v = dropout.identity_values(inputs, 1)
    first = v[:33]  # sequence 0: keys 16..31 of block 1
    assert first.sum() == 16 * 2
    assert (first[16:32, 0] == torch.eye(16, dtype=v.dtype)).all()
    assert v[33:45].sum() == 0  # sequence 1 has only 12 keys: nothing in block 1


# ------------------------------------------------------------------- the check's entry point


class Context:
    """Imitates the lead's CheckContext: seeded calls keyed by a salt (harness.checks.context)."""

    def __init__(self, forward, case, seed=0):
        self.forward, self.case, self.seed = forward, case, seed
        self.inputs = make_inputs(case, "cpu", seed)

    def call(self, inputs, rng="kernel"):
        from harness.exact.inputs import derive_seed

        torch.manual_seed(derive_seed(self.seed, self.case.case_id, rng))
        return self.forward(inputs)

    def call_backward(self, rng="kernel"):
        leaves = self.inputs.with_grad()
        out = self.call(leaves, rng=rng).out
        dq, dk, dv = torch.autograd.grad(out, (leaves.q, leaves.k, leaves.v), self.inputs.dout)
        return Outputs(out=out.detach(), dq=dq, dk=dk, dv=dv)


def run_exact(context):
    def call(inputs, salt):
        return context.call(inputs, rng=salt)

    fwd = dropout.exact_dropout("fwd", context.inputs, call)
    bwd = dropout.exact_dropout("bwd", context.inputs, call, context.call_backward,
                                recovery=fwd.recovery)
    return fwd, bwd


def test_exact_dropout_runs_both_checks_and_reuses_the_recovery():
    fwd, bwd = run_exact(Context(zoo("backward_new_mask"), Case(**BASE)))
    assert fwd.verdict.status == "pass" and bwd.verdict.status == "fail"
    assert bwd.recovery is fwd.recovery
    assert bwd.verdict.metrics["dropout"]["calls"] == fwd.recovery.calls + 1
    assert fwd.verdict.metrics["dropout"]["total_s"] > 0


def test_exact_dropout_says_why_it_falls_back():
    fwd, _ = run_exact(Context(zoo("unseeded"), Case(**BASE)))
    assert fwd.verdict is None and "not a function of the seed" in fwd.why_not
    big = Context(zoo("correct"), Case(**{**BASE, "seqlen_k": 1024}))
    fwd, _ = run_exact(big)
    assert fwd.verdict is None and fwd.recovery is None and "kernel calls" in fwd.why_not


def test_the_statistical_test_cannot_see_a_backward_with_another_mask():
    """Why the exact route exists: over 48 seeds the gradients of backward_new_mask are
    unbiased (each mask alone has the right distribution), so the statistical verdict passes."""
    context = Context(zoo("backward_new_mask"), Case(**BASE))
    samples: dict[str, list] = {}
    for i in range(48):
        for name, t in context.call_backward(rng=f"dropout-{i}").grads().items():
            samples.setdefault(name, []).append(t.double())
    ref = reference.reference(context.inputs, grads=True).grads()
    base = reference.baseline(context.inputs, grads=True).grads()
    statistical = judge.dropout_verdict("bwd", samples, ref, {k: None for k in ref}, base,
                                        k=judge.K_GRAD, atol=judge.ATOL[torch.float16])
    assert statistical.status == "pass", statistical.reason
    _, bwd = run_exact(context)
    assert bwd.verdict.status == "fail"


def test_two_seeds_agreeing_on_one_key_is_chance_not_seed_independence():
    """b1 q1 k1: two masks of one entry agree with probability p**2 + (1-p)**2 (0.72 at
    p = 0.17), so their agreement must not fail a correct kernel (SDPA math did, found by
    exploration)."""
    from harness.run.worker import Task, execute
    from harness.target import detect

    case = Case(batch=1, seqlen_q=1, seqlen_k=1, heads_q=1, head_dim=64, dtype="float16",
                dropout_p=0.17)
    records = [r for kind, r in execute(Task("t", case, "sdpa-math", ("fwd",)), detect(), {})
               if kind == "record"]
    assert [r.status for r in records] == ["pass"], records[0].reason


def test_the_seed_comparison_sees_keys_outside_the_first_identity_block():
    """q1 k1024 window [1, -1]: the visible keys are the last two, outside V's first identity
    block, whose output is all zero under any seed; the seed comparison must see them (SDPA math
    was flagged as seed-independent here, found by exploration)."""
    from harness.run.worker import Task, execute
    from harness.target import detect

    case = Case(batch=3, seqlen_q=1, seqlen_k=1024, heads_q=12, heads_kv=3, head_dim=64,
                dtype="float16", window=(1, -1), dropout_p=0.17)
    records = [r for kind, r in execute(Task("t", case, "sdpa-math", ("fwd",)), detect(), {})
               if kind == "record"]
    assert [r.status for r in records] == ["pass"], records[0].reason


def test_rows_too_small_to_compare_are_never_compared():
    # 65,536 tiny problems (2 x 2 entries each) cannot share a testable mask: before the rows
    # were filtered, every pair of them was compared (2 billion row pairs, a minute a case).
    need = dropout._identical_needed(0.3)
    ok = torch.ones(65536, 4, dtype=torch.bool)
    keep = torch.zeros(65536, 4, dtype=torch.bool)
    assert dropout._identical_rows(keep, ok, need) == (0, [])
    # Rows that can be tested still are, with their own indices, the first ROWS_MAX of them.
    n = dropout.ROWS_MAX + 40
    gen = torch.Generator().manual_seed(0)
    keep = torch.rand(n, 4 * need, generator=gen) > 0.3
    keep[17] = keep[3]
    ok = torch.ones_like(keep)
    ok[0] = False  # row 0 has nothing decided: skipped, indices keep their meaning
    pairs, same = dropout._identical_rows(keep, ok, need)
    assert same == [[3, 17]]
    assert pairs == dropout.ROWS_MAX * (dropout.ROWS_MAX - 1) // 2
