"""report.py and plot.py: JSON, markdown table, the RESULTS.md section, the Pareto plot."""
import json

from tardis_compiler.eval.plot import pareto_plot
from tardis_compiler.eval.report import (environment, markdown_block, markdown_table,
                                         update_results_md, write_results)


def _row(method, budget, read, ppl, acc):
    return {"method": method, "budget": budget,
            "ffn_bytes": {"ffn_read_bytes_per_token": read * 2**20, "ffn_read_fraction": read,
                          "ffn_resident_bytes": 2**20, "ffn_resident_fraction": 1.0,
                          "ffn_dense_bytes": 2**20},
            "metrics": {"ppl": ppl, "piqa": {"acc": acc, "acc_norm": acc}, "lambada": {"acc": acc},
                        "mean_accuracy": acc}}


def _results(preset="quick"):
    return {"config": {"preset": preset}, "seconds": 60.0,
            "model": {"name": "smollm2", "kind": "causal-lm", "class": "LlamaForCausalLM",
                      "dtype": "torch.float32", "context_length": 512},
            "data": {"calibration_batches": 2, "calibration_tokens": 1024, "ppl_windows": 2,
                     "ppl_tokens": 1024, "tasks": {"piqa": 5, "lambada": 5}, "passages": 0},
            "run": environment(),
            "rows": [_row("dense", 1.0, 1.0, 20.0, 0.6), _row("wanda", 0.5, 0.5, 30.0, 0.5),
                     _row("teal", 0.5, 0.49, 25.0, 0.55)]}


def test_table_has_bytes_relative_ppl_and_tasks():
    table = markdown_table(_results())
    lines = table.splitlines()
    assert lines[0].startswith("| method | budget | FFN bytes read/token | FFN bytes resident | PPL")
    assert "| PIQA | LAMBADA | mean acc | vs dense (paired) |" in lines[0]
    # No standard errors or per-item outcomes in these rows: none shown (older results files).
    assert lines[3] == "| wanda | 0.50 | 0.500 (0.5 MiB) | 1.000 (1.0 MiB) | 30.00 (+50%) | 50.0 | 50.0 | 50.0 | - |"
    assert lines[2].startswith("| dense | - |")


def test_results_md_section_is_created_then_updated_in_place(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Results\n\n## Speed\n\nlead's numbers\n\n## Later\n\nmore\n")
    results = _results()
    update_results_md(path, results, "first version")
    update_results_md(path, _results("standard"), "standard block")
    update_results_md(path, results, "second version")
    text = path.read_text()
    assert text.startswith("# Results\n\n## Speed\n\nlead's numbers\n\n## Later\n\nmore\n")
    section = text[text.index("## Evaluation harness"):]
    assert "second version" in section and "first version" not in section
    assert section.index("second version") < section.index("standard block")  # kept its place
    assert text.count("<!-- tardis-eval:smollm2:quick:begin -->") == 1


def test_section_in_the_middle_leaves_following_sections_alone(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# R\n\n## Evaluation harness\n\nintro\n\n## Speed\n\nkeep me\n")
    update_results_md(path, _results(), "block")
    text = path.read_text()
    assert text.endswith("## Speed\n\nkeep me\n")
    assert text.index("block") < text.index("## Speed")


def test_missing_file_is_created(tmp_path):
    path = tmp_path / "docs" / "RESULTS.md"
    update_results_md(path, _results(), markdown_block(_results()))
    assert path.read_text().startswith("# Results\n\n## Evaluation harness\n")


def test_json_and_plot_are_written(tmp_path):
    path = write_results(_results(), tmp_path)
    assert json.loads(path.read_text())["rows"][1]["method"] == "wanda"
    png = pareto_plot(_results(), tmp_path / "plot.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_environment_records_machine_versions_and_date():
    env = environment()
    assert env["machine"]["cpu_count"] >= 1 and env["versions"]["torch"]
    assert env["date"][:2] == "20"
