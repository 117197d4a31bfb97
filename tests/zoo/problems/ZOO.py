"""The issue 26 bug zoo: buggy copies of tests/fixtures/flash_attn_ref.py (test fixtures), one per
file, each with a bug of one of issue 26's problem classes; load one through the harness as

    attn-harness run --backend flash-attn@tests/zoo/problems/sink_in_numerator.py

``ZOO`` maps each variant to the checks expected to catch it, ``PROBLEM`` to its class and
``NEEDS`` to what a case must have for the bug to show. No ``__init__.py``: every file loads by
path. The fp8 bugs of the class (lazy rescaling, bf16 accumulation) are variants of the fp8
fixture in tests/zoo/fp8/.
"""

ZOO = {
    "mla_scale_dv": ("fwd", "bwd"),
    "sink_ignored": ("fwd", "bwd"),
    "sink_in_numerator": ("fwd", "bwd"),
    "sink_tokens_unmasked": ("fwd", "bwd"),
    "kv_scale_twice": ("fwd",),
    "kv_scale_per_tensor": ("fwd",),
    "mask_by_multiply": ("fwd",),
    "reads_past_length": ("fwd",),
    "decode_fold16": ("fwd",),
}

PROBLEM = {
    "mla_scale_dv": "MLA head dims",
    "sink_ignored": "learnable sinks",
    "sink_in_numerator": "learnable sinks",
    "sink_tokens_unmasked": "sink tokens",
    "kv_scale_twice": "fp8 KV caches",
    "kv_scale_per_tensor": "fp8 KV caches",
    "mask_by_multiply": "poisoned padding",
    "reads_past_length": "poisoned padding",
    "decode_fold16": "serving decode",
}

NEEDS = {
    "mla_scale_dv": "head_dim_v != head_dim and no explicit scale",
    "sink_ignored": "learnable_sink",
    "sink_in_numerator": "learnable_sink with a row that sees a key",
    "sink_tokens_unmasked": "sink_tokens > 1 with a causal or right-bounded window and rows "
                            "before the sink tokens (seqlen_q close to seqlen_k)",
    "kv_scale_twice": "kv_dtype (fp8 KV cache) with a k scale != 1",
    "kv_scale_per_tensor": "kv_dtype with per-head scales (fp8_recipe = per-head) or batch > 1",
    "mask_by_multiply": "padding past a sequence's length in memory: a kv-cache shorter than its "
                        "capacity, a paged or padded varlen layout",
    "reads_past_length": "a sequence whose length is not a multiple of 64 with padding after it",
    "decode_fold16": "q_len 1 with heads_q not a multiple of 16 and heads_kv > 1 (GQA ratio "
                     "not 16)",
}
