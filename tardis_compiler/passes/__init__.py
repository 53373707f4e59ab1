"""Graph passes, in pipeline order. Each rewrite pass has the signature ``(gm, ctx) -> gm`` and logs
what it rewrote into ``ctx.log``; ``find_ffns`` is the shared matcher they all start from."""
from .context import PassContext, copy_graph_module, placeholder_fqns
from .find_ffns import FFNMatch, LinearSpec, SkippedFFN, find_ffns
from .fold_ffns import fold_ffns
from .record_ffn_inputs import record_ffn_inputs

__all__ = [
    "FFNMatch", "LinearSpec", "PassContext", "SkippedFFN", "copy_graph_module", "find_ffns",
    "fold_ffns", "placeholder_fqns", "record_ffn_inputs",
]
