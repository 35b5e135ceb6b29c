"""tfpure.testing: property tests for your own training code.

Assertions take your model, loss, steps and batches and raise
`AssertionError` with what differed and where:

  * `properties`: one model or step (gradients vs finite differences, the
    training flag, a pure eval step);
  * `equivalence`: the same training run two ways (graph vs eager, fused vs
    one step per call, a step vs the tutorial's hand-written step);
  * `tracing`: how often a step compiles.

Hypothesis strategies (`strategies`) draw small models and ragged batches to
feed them. Requires the ``testing`` extra (``pip install "tfpure[testing]"``).
"""

from tfpure.testing import strategies
from tfpure.testing.equivalence import (
    assert_fused_matches_sequential,
    assert_graph_matches_eager,
    assert_step_matches_reference,
)
from tfpure.testing.properties import (
    assert_eval_step_pure,
    assert_gradients_match_numeric,
    assert_training_flag_respected,
    snapshot,
    state_variables,
)
from tfpure.testing.tracing import assert_no_retrace, count_traces

__all__ = [
    "assert_eval_step_pure",
    "assert_fused_matches_sequential",
    "assert_gradients_match_numeric",
    "assert_graph_matches_eager",
    "assert_no_retrace",
    "assert_step_matches_reference",
    "assert_training_flag_respected",
    "count_traces",
    "snapshot",
    "state_variables",
    "strategies",
]
