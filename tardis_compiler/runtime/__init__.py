"""Lowering: the fused custom op, its fold cache, the guard, and the correction kernels."""
