"""Running the checks of one case on one backend, in this process.

Read bottom up: ``plan`` (which checks run and why not the others), ``registry`` (the check
functions by name, what a kernel call may raise), ``contract`` (private input copies, what a call
must return), ``ledger`` (every later output held to the judged one), ``timing`` (the timing
protocol), the checks themselves (``parity``: fwd and bwd; ``determinism``; ``throughput``),
``context`` (what the checks of a case share, computed once; it imports the checks, so all are
registered) and ``runner`` (a plan's checks in registry order). This package module imports
nothing, so the light ``plan`` and ``timing`` stay light."""
