"""The parity suites users run under pytest, shipped with the package.

    pytest --pyargs harness.parity --attn-backend sdpa-math
    pytest --pyargs harness.parity --attn-backend flash-attn --attn-suite models

``test_cases.py`` runs every case of ``--attn-suite`` (default: smoke) on every
``--attn-backend`` (default: every backend available here); ``test_explore.py`` explores each
backend and fails with the minimal case and its replay command. The fixtures come from the
plugin (``attn_harness_pytestplugin``); the session behind them is ``harness.run.session``.
"""
