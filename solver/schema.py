"""The problem file schema ``bitsack.problem/v1``: one import for reading, writing, checking
and transforming problems.

The work is done in modules of one concept each; this module gathers their public names:

- ``bitsack.solver.problem_io``: ``load_problem`` / ``dump_problem`` (files, by extension);
- ``bitsack.solver.bounded``: reading untrusted files within size, depth and node bounds
  (no YAML aliases), bounded ``short_repr`` for messages, ``.npz`` headers;
- ``bitsack.solver.validate``: ``problem_from_dict`` / ``validate_problem`` (every field
  checked, its path named);
- ``bitsack.solver.numeric``: the numerically safe range of losses, costs and limits;
- ``bitsack.solver.sidecar``: the interaction factor's ``.npz`` (confined, header-checked);
- ``bitsack.solver.document``: ``problem_to_dict``;
- ``bitsack.solver.transforms``: ``with_limits``, ``restrict_options``, ``without_option``,
  ``with_interaction_weight``, ``avg_bits_limit``;
- ``bitsack.solver.yaml_emit``: the YAML writer.
"""

from bitsack.solver.document import problem_to_dict
from bitsack.solver.problem_io import dump_problem, load_problem
from bitsack.solver.transforms import (
    avg_bits_limit,
    restrict_options,
    with_interaction_weight,
    with_limits,
    without_option,
)
from bitsack.solver.validate import problem_from_dict, validate_problem

__all__ = [
    "avg_bits_limit",
    "dump_problem",
    "load_problem",
    "problem_from_dict",
    "problem_to_dict",
    "restrict_options",
    "validate_problem",
    "with_interaction_weight",
    "with_limits",
    "without_option",
]
