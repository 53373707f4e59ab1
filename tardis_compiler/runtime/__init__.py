"""Lowering: the pack layout and builder, the ``tardis::ffn`` op, the fused CPU kernel, the guard."""
