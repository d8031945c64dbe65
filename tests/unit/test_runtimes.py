"""Unit tests for inferd.runtimes: validate_params and validate_options of the torch runtime.

Every refusal must name the offending param or option first (``"name: ..."``), so a client or an
operator knows what to fix. These checks are torch-free: the spec never imports the runner.
"""

from __future__ import annotations

import sys

import pytest

from inferd.runtimes import SPECS, TORCH_MODELS, validate_options, validate_params

INJECTION = {"fault_injection": True}


def params_problem(params: dict, options: dict | None = None) -> str | None:
    return validate_params("torch", params, options or {})


def assert_names(problem: str | None, name: str) -> None:
    assert problem is not None, f"{name}: accepted"
    assert problem.startswith(f"{name}: "), problem


# --- params --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("params", [
    {},
    {"max_tokens": 1},
    {"max_tokens": 1_000_000},
    {"temperature": 0},
    {"temperature": 0.7, "top_p": 0.9, "seed": 42},
    {"temperature": 100, "top_p": 1},
    {"temperature": 1, "top_p": 1e-9},
    {"seed": 0},
    {"seed": 2**63 - 1},
    {"stop": "\n"},
    {"stop": ["a", "bb", "x" * 256]},
    {"stop": [str(i) for i in range(16)]},
])
def test_valid_params(params):
    assert params_problem(params) is None


def test_unknown_param_is_named_and_known_ones_listed():
    problem = params_problem({"temprature": 0.5})
    assert_names(problem, "temprature")
    assert "unknown" in problem
    for known in ("max_tokens", "temperature", "top_p", "seed", "stop"):
        assert known in problem


@pytest.mark.parametrize("name, value", [
    ("temperature", -1),
    ("temperature", -0.001),
    ("temperature", 100.5),
    ("temperature", "hot"),
    ("temperature", True),
    ("temperature", None),
    ("top_p", 0),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("top_p", -0.1),
    ("top_p", "all"),
    ("seed", -1),
    ("seed", 2**63),
    ("seed", 1.5),
    ("seed", "7"),
    ("seed", False),
    ("max_tokens", 0),
    ("max_tokens", -5),
    ("max_tokens", 1_000_001),
    ("max_tokens", 10.0),
    ("max_tokens", "10"),
    ("stop", ""),
    ("stop", []),
    ("stop", [str(i) for i in range(17)]),
    ("stop", ["ok", 3]),
    ("stop", ["ok", None]),
    ("stop", ["ok", ""]),
    ("stop", "x" * 257),
    ("stop", ["x" * 257]),
    ("stop", 17),
    ("stop", {"a": 1}),
])
def test_bad_param_is_named(name, value):
    problem = params_problem({name: value})
    assert_names(problem, name)
    assert "expected " in problem and problem.endswith(f"got {value!r}"), problem


def test_bad_param_message_says_what_was_expected():
    problem = params_problem({"temperature": -1})
    assert problem == "temperature: expected a number between 0 (greedy) and 100, got -1"
    problem = params_problem({"top_p": 1.5})
    assert "(0, 1]" in problem and "1.5" in problem


def test_first_bad_param_is_reported_among_good_ones():
    assert_names(params_problem({"max_tokens": 5, "top_p": 0, "temperature": 1}), "top_p")


def test_fault_refused_without_fault_injection():
    for options in ({}, {"fault_injection": False}, {"fault_injection": "true"}, {"fault_injection": 1}):
        problem = params_problem({"fault": "oom"}, options)
        assert_names(problem, "fault")
        # Not offered while fault injection is off: unknown, and absent from the known params.
        assert problem.startswith("fault: unknown; known: ") and "fault" not in problem.split("known:")[1]
        assert "fault" not in (params_problem({"bogus": 1}, options) or "").split("known:")[1]


@pytest.mark.parametrize("fault", ["oom", "poison", "error"])
def test_fault_accepted_with_fault_injection(fault):
    assert params_problem({"fault": fault}, INJECTION) is None


@pytest.mark.parametrize("fault", ["crash", "hang", "", 1])
def test_unknown_fault_refused_even_with_fault_injection(fault):
    assert_names(params_problem({"fault": fault}, INJECTION), "fault")


def test_echo_params_are_not_torch_params():
    assert_names(params_problem({"delay_ms": 5}), "delay_ms")


# --- options -------------------------------------------------------------------------------------------

def options_problem(options: dict) -> str | None:
    return validate_options("torch", options)


@pytest.mark.parametrize("options", [
    {},
    {"model": "tiny"},
    {"model": "tests.unit.tiny_factory:build_small", "seed": 3},
    {"model": "pkg:factory"},
    {"weights": "/models/w.safetensors", "dtype": "bfloat16"},
    {"dtype": "float16"},
    {"dtype": "float32", "max_batch_size": 1, "max_batch_delay_ms": 0},
    {"max_batch_size": 4096, "max_batch_delay_ms": 10_000},
    {"max_batch_delay_ms": 2.5, "cpu_threads": 1},
    {"fault_injection": True},
    {"fault_injection": False},
])
def test_valid_options(options):
    assert options_problem(options) is None


@pytest.mark.parametrize("name, value", [
    ("dtype", "float64"),
    ("dtype", "fp16"),
    ("dtype", 16),
    ("model", "nope"),
    ("model", ""),
    ("model", "pkg.module"),
    ("model", "pkg.:factory"),
    ("model", "pkg.mod:"),
    ("model", "pkg-name.mod:build"),
    ("model", "pkg.mod:build()"),
    ("model", 7),
    ("max_batch_size", 0),
    ("max_batch_size", -1),
    ("max_batch_size", 4097),
    ("max_batch_size", 2.0),
    ("max_batch_size", True),
    ("max_batch_delay_ms", -1),
    ("max_batch_delay_ms", 10_001),
    ("max_batch_delay_ms", "2"),
    ("cpu_threads", 0),
    ("seed", -1),
    ("weights", ""),
    ("weights", 3),
    ("fault_injection", "yes"),
    ("fault_injection", 1),
])
def test_bad_option_is_named(name, value):
    problem = options_problem({name: value})
    assert_names(problem, name)
    assert problem.endswith(f"got {value!r}"), problem


def test_unknown_option_is_named_and_known_ones_listed():
    problem = options_problem({"batch_size": 8})
    assert_names(problem, "batch_size")
    assert "unknown" in problem
    for known in ("max_batch_size", "dtype", "model", "weights"):
        assert known in problem


def test_bad_model_message_lists_the_builtins():
    problem = options_problem({"model": "nope"})
    for builtin in TORCH_MODELS:
        assert builtin in problem
    assert "package.module:callable" in problem


def test_fault_is_a_param_not_an_option():
    assert_names(options_problem({"fault": "oom", "fault_injection": True}), "fault")


def test_the_spec_does_not_import_torch_or_the_runner():
    spec = SPECS["torch"]
    assert spec.runner == "inferd.runtimes.torch_runtime:TorchRunner"
    assert spec.chunk_joiner == ""
    assert {"torch", "safetensors"} <= set(spec.requires)
    # Validation alone never imports the runner's module (it imports torch).
    before = set(sys.modules)
    validate_options("torch", {"model": "tiny"})
    validate_params("torch", {"max_tokens": 3}, {})
    assert not {m for m in set(sys.modules) - before if m.startswith(("torch", "inferd.runtimes.torch_runtime"))}


# --- missing packages ------------------------------------------------------------------------------------

def test_missing_modules_are_found_without_importing_them(monkeypatch):
    import dataclasses

    from inferd.config import parse
    from inferd.daemon import missing_runtime_modules

    assert SPECS["torch"].missing_modules() == []  # the test environment has the torch extra
    absent = dataclasses.replace(SPECS["torch"], requires=("torch", "inferd_no_such_module"))
    assert absent.missing_modules() == ["inferd_no_such_module"]
    monkeypatch.setitem(SPECS, "torch", absent)
    config = parse({"deployment": [{"name": "echo", "runtime": "echo"}, {"name": "tiny", "runtime": "torch"}]},
                   "<test>")
    problems = missing_runtime_modules(config)
    assert problems == ["deployment tiny: runtime torch needs inferd_no_such_module, not installed "
                        "(pip install 'inferd[torch]'); its workers will fail"]
