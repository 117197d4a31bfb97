"""The case stage: one attention problem (:class:`Case`, in :mod:`harness.case.model`), the
suites that name many (:mod:`harness.case.suites`, read from the shipped library in
``harness/case/library/`` and a project's own ``cases/``) and the known issues that excuse some
(:mod:`harness.case.known_issues`). Pure data: nothing here imports torch.

``from harness.case import Case`` is the stable import path for plugin authors and notebooks.
"""

from harness.case.model import (
    ALIBI_SLOPES,
    CACHE_BATCH_FACTOR,
    DTYPE_BYTES,
    DTYPE_MAX,
    DTYPES,
    ENTRIES,
    FIELD_NAMES,
    FP8_DTYPES,
    FP8_OUT_DTYPES,
    FP8_RECIPES,
    LAYOUT_ENTRIES,
    LAYOUT_FEATURES,
    LAYOUTS,
    METADATA_FIELDS,
    ORIGINAL_FIELDS,
    VALUE_SCALE_DEFAULTS,
    VALUES,
    Case,
    attended_pairs,
    case_from_dict,
    grid,
    toml_string,
    toml_value,
    unknown_field_message,
)

__all__ = [
    'ALIBI_SLOPES',
    'CACHE_BATCH_FACTOR',
    'DTYPES',
    'DTYPE_BYTES',
    'DTYPE_MAX',
    'ENTRIES',
    'FIELD_NAMES',
    'FP8_DTYPES',
    'FP8_OUT_DTYPES',
    'FP8_RECIPES',
    'LAYOUTS',
    'LAYOUT_ENTRIES',
    'LAYOUT_FEATURES',
    'METADATA_FIELDS',
    'ORIGINAL_FIELDS',
    'VALUES',
    'VALUE_SCALE_DEFAULTS',
    'Case',
    'attended_pairs',
    'case_from_dict',
    'grid',
    'toml_string',
    'toml_value',
    'unknown_field_message',
]
