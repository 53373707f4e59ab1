"""Graph passes, in pipeline order. Each rewrite pass has the signature ``(gm, ctx) -> gm`` (the
record pass takes its hook too) and logs what it rewrote into ``ctx.log``; ``find_ffns`` is the
shared matcher they all start from (``find_gated_ffns``, then ``find_plain_ffns``, on the graph
vocabulary of ``ffn_graph``)."""
from .capture import capture_graphs
from .context import (PassContext, TrainingModeError, copy_graph_module, ffn_slots, placeholder_fqns,
                      refuse_training_graph)
from .ffn_graph import LinearSpec, SkippedFFN
from .find_ffns import find_ffns
from .find_gated_ffns import GatedFFNMatch
from .find_plain_ffns import FFNMatch
from .fold_ffns import fold_ffns
from .record_ffn_inputs import record_ffn_inputs

__all__ = [
    "FFNMatch", "GatedFFNMatch", "LinearSpec", "PassContext", "SkippedFFN", "TrainingModeError", "capture_graphs",
    "copy_graph_module",
    "ffn_slots", "find_ffns", "fold_ffns", "placeholder_fqns", "record_ffn_inputs", "refuse_training_graph",
]
