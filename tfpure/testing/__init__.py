"""tfpure.testing: property tests for your own training code.

Assertions (`properties`) take your model, loss, steps and batches and raise
`AssertionError` with what differed and where; Hypothesis strategies
(`strategies`) draw small models and ragged batches to feed them. Requires
the ``test`` extra (``pip install "tfpure[test]"``) for Hypothesis.
"""

from tfpure.testing import strategies
from tfpure.testing.properties import (
    assert_eval_step_pure,
    assert_fused_matches_sequential,
    assert_gradients_match_numeric,
    assert_graph_matches_eager,
    assert_no_retrace,
    assert_training_flag_respected,
    snapshot,
)

__all__ = [
    "assert_eval_step_pure",
    "assert_fused_matches_sequential",
    "assert_gradients_match_numeric",
    "assert_graph_matches_eager",
    "assert_no_retrace",
    "assert_training_flag_respected",
    "snapshot",
    "strategies",
]
