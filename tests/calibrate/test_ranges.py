"""ranges.py: shortest intervals, least-squares lines and their worst-case error."""
import torch

from tardis_compiler.calibrate.ranges import fit_lines, max_line_error, shortest_intervals


def test_shortest_interval_covers_fraction():
    z = torch.randn(1000, 3)
    lo, hi = shortest_intervals(z, 0.8)
    inside = ((z >= lo) & (z <= hi)).float().mean(0)
    assert torch.all(inside >= 0.8) and torch.all(inside <= 0.81)
    lo_wide, hi_wide = shortest_intervals(z, 0.95)
    assert torch.all(hi_wide - lo_wide >= hi - lo)


def test_line_fit_recovers_a_line_and_ignores_out_of_range_points():
    z = torch.linspace(-3, 3, 601)[:, None]
    y = torch.where(z.abs() <= 1, 2 * z - 1, torch.full_like(z, 100.0))
    a, c = fit_lines(z, y, torch.tensor([-1.0]), torch.tensor([1.0]))
    assert abs(a.item() - 2) < 1e-5 and abs(c.item() + 1) < 1e-5


def test_max_line_error_of_relu_chord():
    err = max_line_error(torch.relu, torch.tensor([0.5]), torch.tensor([0.5]), torch.tensor([-1.0]), torch.tensor([1.0]))
    assert abs(err.item() - 0.5) < 1e-6  # the chord of relu on [-1, 1] is 0.5 z + 0.5; worst at z = 0
