"""margins.py: the low-bit guards' recall margins."""
import torch

from tardis_compiler.calibrate.margins import recall_margins


def test_recall_margins_is_the_smallest_common_scale_meeting_the_target():
    g = torch.Generator().manual_seed(5)
    z = torch.randn(2000, 16, generator=g)
    z_hat = z + 0.2 * torch.randn(2000, 16, generator=g)
    lower, upper = torch.full((16,), -0.8), torch.full((16,), 0.9)
    outside = (z < lower) | (z > upper)
    sigma = (z_hat - z).std(0)

    def recall(margin):
        flags = (z_hat < lower + margin) | (z_hat > upper - margin)
        return (flags & outside).sum().item() / outside.sum().item()

    for target in (0.9, 0.99, 0.999):
        margin = recall_margins(z, z_hat, lower, upper, target)
        scale = (margin / sigma).mean().item()
        assert recall(margin) >= target
        assert recall(scale * 0.99 * sigma) < target
