"""Run options and their parsers, shared by the command line and the pytest plugin.

They are declared once, in the top-level module ``attn_harness_pytestplugin`` (so that pytest can
register them without importing this package), and re-exported here for the CLI: each parser
raises ``argparse.ArgumentTypeError("could not parse 'VALUE': ...")``, which both argparse and
pytest turn into a one-line usage error. Nothing here imports torch.
"""

from __future__ import annotations

from attn_harness_pytestplugin import (
    OPTIONS,
    PREFIX,
    Option,
    add_options,
    option_values,
)
from attn_harness_pytestplugin import parse_checks as checks
from attn_harness_pytestplugin import parse_count as count
from attn_harness_pytestplugin import parse_non_negative as non_negative
from attn_harness_pytestplugin import parse_positive as positive
from attn_harness_pytestplugin import parse_profile as profile
from attn_harness_pytestplugin import parse_seed as seed
from attn_harness_pytestplugin import parse_timeout as timeout

__all__ = ["OPTIONS", "PREFIX", "Option", "add_options", "option_values", "checks", "count",
           "non_negative", "positive", "profile", "seed", "timeout"]
