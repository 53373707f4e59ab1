"""Calibrate: record each FFN's inputs on real text, then fit every neuron's range, line or
constant, guard margin and option under a bytes budget. The steps, in pipeline order:

1. ``record``: a reservoir of each FFN's inputs, kept while the model runs under the recording
   backend (``FFNRecord``, ``recording``, ``RECORDING_BACKEND``);
2. ``ranges``: the fit/holdout split, shortest intervals, least-squares lines, window sums;
3. ``margins``: the guard's predictor and the margins of its flag band;
4. ``plain`` / ``gated``: each FFN kind's per-neuron options (candidates), with error and bytes;
5. ``policy``: the knapsack picking one option per neuron, and the encoding of the choice;
6. ``loss_weights``: (allocation "loss") each FFN output's loss sensitivity, one backward pass;
7. ``allocate``: the budget spent per layer or across the model, the chosen mixes measured and
   re-chosen where the held-out bytes overshoot;
8. ``lstsq_fold``: the least-squares map for the error a chosen mix leaves, folded into ``Wf``;
9. ``coverage``: instead of 4-8, the uniform-coverage fit of a plain FFN without a budget;
10. ``sequential``: the FFNs fitted in groups, each on inputs from the model with the groups
    before it compressed;
11. ``drive``: ``calibrate``, ``calibrate_for_budget``, ``record`` and ``Recorder.fit``.

The package re-exports the public API; the step modules import each other directly. The
package's attribute ``record`` is the function ``drive.record``, which shadows the step module
of that name: import from the module with ``from tardis_compiler.calibrate.record import ...``.
"""
from .drive import calibrate, calibrate_for_budget, record
from .record import FFNRecord, Recorder, active_recorder, record_ffn_input, recording
# Fitting helpers that scripts imported from the single calibrate module this package replaced.
from .margins import recall_margins
from .ranges import fit_lines, max_line_error, shortest_intervals, split_tokens

__all__ = ["FFNRecord", "Recorder", "active_recorder", "calibrate", "calibrate_for_budget", "fit_lines",
           "max_line_error", "recall_margins", "record", "record_ffn_input", "recording", "shortest_intervals",
           "split_tokens"]
