"""Pareto plot: accuracy against FFN weight bytes read per token, every method on one figure."""
from __future__ import annotations

from pathlib import Path
from typing import Any

_STYLE = {"dense": ("black", "*"), "wanda": ("tab:blue", "o"), "ria": ("tab:orange", "s"),
          "teal": ("tab:green", "^"), "tardis": ("tab:red", "D")}


def pareto_plot(results: dict[str, Any], path: str | Path) -> Path:
    """Save a PNG: perplexity (log scale) and mean zero-shot accuracy for decoders, or embedding
    cosine for encoders, against the fraction of dense FFN bytes read per token.

    Example:
        >>> pareto_plot(results, out_dir / "eval-minilm.png").suffix
        '.png'
    """
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    encoder = results["model"]["kind"] == "encoder"
    panels = ([("cosine_mean", "mean embedding cosine to dense", False)] if encoder else
              [("ppl", "perplexity (Wikipedia, lower is better)", True),
               ("mean_accuracy", "mean zero-shot accuracy", False)])
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    methods = list(dict.fromkeys(row["method"] for row in results["rows"]))
    for axis, (metric, label, log_scale) in zip(axes[0], panels):
        for index, method in enumerate(methods):
            rows = sorted((r for r in results["rows"]
                           if r["method"] == method and metric in r["metrics"]),
                          key=lambda r: r["ffn_bytes"]["ffn_read_fraction"])
            if not rows:
                continue
            color, marker = _STYLE.get(method, (f"C{index % 10}", "v"))
            x = [r["ffn_bytes"]["ffn_read_fraction"] for r in rows]
            y = [r["metrics"][metric] for r in rows]
            axis.plot(x, y, marker=marker, color=color, label=method,
                      markersize=12 if method == "dense" else 6,
                      linestyle="-" if len(rows) > 1 else "")
        dense = [r["metrics"][metric] for r in results["rows"]
                 if r["method"] == "dense" and metric in r["metrics"]]
        if dense:  # the reference level every method is measured against
            axis.axhline(dense[0], color="black", linestyle=":", linewidth=1, alpha=0.6)
        if log_scale:
            axis.set_yscale("log")
        axis.set_xlabel("FFN weight bytes read per token (fraction of dense)")
        axis.set_ylabel(label)
        axis.set_xlim(0, 1.05)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    model, preset = results["model"]["name"], results["config"]["preset"]
    figure.suptitle(f"{model} ({preset}): accuracy vs FFN weight bytes read per token")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
