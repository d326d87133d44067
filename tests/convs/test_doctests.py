"""The runnable examples in the convs docstrings: each must run and print what it shows."""

import doctest
import importlib
import pkgutil
import types

import pytest

import convs

MODULES = sorted(f"convs.{info.name}" for info in pkgutil.iter_modules(convs.__path__))
# Public API whose docstring gives an example (doctest names: module, then qualified name).
DOCUMENTED = {
    "convs.edge.EdgeConv2d.from_conv",
    "convs.gated.GatedConv2d.from_conv",
    "convs.gated.GatedConv2d.replacements",
    "convs.graph.relu_after_bn",
    "convs.masked.Masked",
    "convs.masked.Masked.forward",
    "convs.partial.PartialConv2d.from_conv",
    "convs.policy.ConvReplacement.replacements",
    "convs.spec.parse_variant",
    "convs.surgery.convert",
}


def run_examples(module: types.ModuleType) -> tuple[doctest.TestResults, set[str]]:
    """Run every docstring example of `module`; return the results and the names of the docstrings with examples.

    A failing example prints the expected and the actual output, which pytest shows with the failure.
    """
    tests = [test for test in doctest.DocTestFinder().find(module) if test.examples]
    runner = doctest.DocTestRunner()
    for test in tests:
        runner.run(test)
    return runner.summarize(verbose=False), {test.name for test in tests}


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    results, documented = run_examples(importlib.import_module(name))
    assert results.failed == 0, f"{results.failed} of {results.attempted} examples in {name} failed (output above)"
    expected = {api for api in DOCUMENTED if api.startswith(f"{name}.")}
    assert expected <= documented, f"no example left in the docstring of {sorted(expected - documented)}"


def test_every_documented_api_is_in_a_tested_module():
    assert all(any(api.startswith(f"{name}.") for name in MODULES) for api in DOCUMENTED)


def test_a_wrong_example_fails():
    """Control: the runner above does report an example whose output is not what its docstring shows."""
    module = types.ModuleType("broken", "Example:\n\n>>> 1 + 1\n3\n")
    results, documented = run_examples(module)
    assert results == (1, 1) and documented == {"broken"}
