"""The examples in the docstrings of the book-facing entry points run and print what
they say (doctest), and each of those entry points documents its arguments and what it
returns."""

import doctest
import importlib

import pytest

# module -> the entry points a chapter calls or includes
ENTRY_POINTS = {
    "smaso.maso": ["maso", "hard_vq", "apply_vq"],
    "smaso.vq": ["soft_vq", "beta_vq"],
    "smaso.gmm": ["posterior", "region_prior", "relu_prior"],
    "smaso.layers": ["layer_maso"],
    "smaso.factorial": ["joint_map", "factorised_map"],
    "smaso.orthogonal": ["orthogonalize"],
    "smaso.activations": ["BetaVQReLU", "two_piece_vq"],
    "smaso.tsallis": ["tsallis_sigmoid"],
    "smaso.stats": ["welch_family", "holm", "bonferroni_halfwidth"],
    "smaso.train": ["fit"],
    "smaso.pack": ["scale_steps", "pack_size"],
    "smaso.records": ["provenance"],
    "smaso.experiment.runner": ["run", "Training"],
    "smaso.experiment.frame": ["Study"],
    "smaso.experiment.activation_study": ["ActivationRun"],
    "smaso.experiment.convstudy": ["CnnRun", "DenoiseRun"],
}
CASES = [(m, name) for m, names in ENTRY_POINTS.items() for name in names]


@pytest.mark.parametrize("module, name", CASES, ids=[f"{m}.{n}" for m, n in CASES])
def test_entry_point_docstring(module, name):
    obj = getattr(importlib.import_module(module), name)
    doc = obj.__doc__ or ""
    assert "Args:" in doc and ("Returns:" in doc or isinstance(obj, type)), (
        f"{module}.{name}: its docstring has no Args:/Returns: section"
    )
    tests = doctest.DocTestFinder(recurse=False).find(obj, name, globs={})
    examples = [e for t in tests for e in t.examples]
    assert examples, f"{module}.{name}: its docstring has no example (>>>)"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for t in tests:
        runner.run(t)
    assert runner.failures == 0, f"{module}.{name}: its docstring example fails"
