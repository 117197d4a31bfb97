"""Run profiles: how much effort each check gets. Data, not code."""

from __future__ import annotations

from dataclasses import dataclass

from harness.errors import UsageError


@dataclass(frozen=True)
class Profile:
    """Budgets of one profile.

    Attributes:
        name: quick, nightly or exhaustive.
        explore_examples: hypothesis-generated cases per backend on top of the suites.
        warmup_s: throughput warm-up time budget per timed function, seconds.
        budget_s: throughput measurement time budget per timed function, seconds.
        min_reps: fewest timed repetitions, whatever the budget.
        dropout_samples: kernel runs (seeds) behind a statistical dropout verdict.
        timeout_s: default per-check time limit in the worker, seconds.
        determinism_runs: runs the determinism check compares where the kernel promises a
            deterministic backward (flash-attn's race-condition test repeats 250 times); two
            otherwise.
        graph_replay: time CUDA/HIP graph replays instead of plain calls (for tiny problems,
            where launch overhead dominates; ``attn-harness run --graph-replay``). Timing falls
            back to plain calls, and says so in the record, where capture is impossible.
    """

    name: str
    explore_examples: int
    warmup_s: float
    budget_s: float
    min_reps: int
    dropout_samples: int
    timeout_s: float
    determinism_runs: int = 2
    graph_replay: bool = False


PROFILES = {
    "quick": Profile("quick", explore_examples=20, warmup_s=0.05, budget_s=0.25, min_reps=5,
                     dropout_samples=48, timeout_s=300.0, determinism_runs=3),
    "nightly": Profile("nightly", explore_examples=300, warmup_s=0.2, budget_s=1.0, min_reps=10,
                       dropout_samples=96, timeout_s=900.0, determinism_runs=50),
    "exhaustive": Profile("exhaustive", explore_examples=3000, warmup_s=0.5, budget_s=2.0,
                          min_reps=20, dropout_samples=192, timeout_s=1800.0,
                          determinism_runs=250),
}


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise UsageError(f"--profile {name}: unknown profile "
                         f"(choose {', '.join(PROFILES)})") from None
