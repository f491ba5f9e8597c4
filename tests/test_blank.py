"""tests/blank.py: a blanked function keeps its signature and docstring and raises, naming itself;
every exercise's functions exist."""
import importlib.util
import inspect
import os
import shutil
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import blank  # noqa: E402  (tests/blank.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_blanked_function_keeps_its_signature_and_docstring_and_names_itself(tmp_path):
    path = tmp_path / "reward.py"
    shutil.copy(os.path.join(ROOT, "reward.py"), path)
    import reward
    assert blank.blank(str(path), "iou", exercise=1)
    blanked = _load(str(path), "reward_blanked")
    assert inspect.signature(blanked.iou) == inspect.signature(reward.iou)
    assert blanked.iou.__doc__ == reward.iou.__doc__
    with pytest.raises(NotImplementedError, match=r"write reward\.iou \(exercise 1"):
        blanked.iou([0, 0, 1, 1], [0, 0, 1, 1])
    assert blanked.parse("<answer>A</answer>").answer == "A"       # the rest of the file works


@pytest.mark.parametrize("n", sorted(blank.EXERCISES))
def test_every_exercise_names_functions_that_exist(n, tmp_path):
    for target in blank.EXERCISES[n][1]:
        module, name = target.split(".", 1)
        shutil.copy(os.path.join(ROOT, module + ".py"), tmp_path / (module + ".py"))
        assert blank.blank(str(tmp_path / (module + ".py")), name, n), target
