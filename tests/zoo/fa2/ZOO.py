"""The flash-attn 2 bug zoo: buggy copies of tests/fixtures/flash_attn_ref.py (test fixtures).

Each ``tests/zoo/fa2/<bug>.py`` is the pure-PyTorch flash-attn 2.8 fixture with one bug that real
ports had in the kv-cache, paged, split-KV, packed and mask paths; load one through the harness as

    attn-harness run --backend flash-attn@tests/zoo/fa2/append_one_late.py

``ZOO`` maps each variant to the checks expected to catch it (``fwd`` judges the output, the lse
and the kv-cache contents after an append; ``bwd`` the gradients) and ``NEEDS`` to what a case
must have for the bug to show. No ``__init__.py``: every file loads by path.
"""

ZOO = {
    "append_one_late": ("fwd",),
    "rotary_swapped": ("fwd",),
    "batch_idx_ignored": ("fwd",),
    "leftpad_ignored": ("fwd",),
    "splits_lse_gqa": ("fwd",),
    "splits_drop_later": ("fwd",),
    "paged_varlen_later": ("fwd",),
    "paged_kvcache_page0": ("fwd",),
    "softcap_varlen_bwd": ("bwd",),
    "qkvpacked_grad_strides": ("bwd",),
    "window_docstring": ("fwd", "bwd"),
    "alibi_causal_distance": ("fwd",),
}

#: What a case needs for each bug to be observable (for choosing the cases that catch it).
NEEDS = {
    "append_one_late": "kvcache with seqlen_new > 0",
    "rotary_swapped": "kvcache with rotary_dim > 0 (either convention)",
    "batch_idx_ignored": "kvcache with cache_batch_idx",
    "leftpad_ignored": "kvcache with cache_leftpad > 0 for some sequence",
    "splits_lse_gqa": "kvcache decode: seqlen_q 1, heads_q > heads_kv, no window or ALiBi, "
                      "num_splits > 1 (lse only)",
    "splits_drop_later": "kvcache with num_splits > 1 and keys past the first split",
    "paged_varlen_later": "varlen with paged_block_size > 0 and batch > 1",
    "paged_kvcache_page0": "kvcache with paged_block_size > 0 and more than one page used",
    "softcap_varlen_bwd": "varlen with softcap > 0 (gradients)",
    "qkvpacked_grad_strides": "layout packed-qkv (or packed-kv) with gradients",
    "window_docstring": "a window side >= seqlen_k, or a one-sided window with seqlen_q > "
                        "seqlen_k (e.g. q3 k1 window (-1, 1); q300 k100 window (31, -1))",
    "alibi_causal_distance": "causal ALiBi with seqlen_q > 1 or ALiBi (lse only)",
}
