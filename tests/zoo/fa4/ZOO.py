"""The FlashAttention-4 bug zoo: buggy copies of tests/fixtures/fa4_ref.py (test fixtures).

Each ``tests/zoo/fa4/<bug>.py`` is the pure-PyTorch FA4 fixture with one bug of the kind FA4's
tracker reported or its design invites; load one through the harness as

    attn-harness run --backend flash-attn4@tests/zoo/fa4/paged_dv_stale_v.py \\
        --suite tests/zoo/fa4/cases.toml

``ZOO`` maps each variant to the checks expected to catch it, ``NEEDS`` to what a case must
have for the bug to show (``cases.toml`` holds one such case each). No ``__init__.py``: every
file loads by path.
"""

ZOO = {
    "paged_dv_stale_v": ("fwd",),
    "sink_in_numerator": ("fwd",),
    "sink_every_split": ("fwd",),
}

NEEDS = {
    "paged_dv_stale_v": "paged KV with a page size other than 128 and head_dim != head_dim_v "
                        "(DeepSeek's 192/128; Dao-AILab/flash-attention #2367, fixed by #2368)",
    "sink_in_numerator": "a learnable sink and a row that sees a key",
    "sink_every_split": "a learnable sink with num_splits > 1 and keys in more than one split "
                        "(split-KV exists on SM100/SM110 only)",
}
