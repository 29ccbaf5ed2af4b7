"""The code-shape guard: one constant or one string argument makes another shape; a
docstring does not."""

from __future__ import annotations

import functools

from accel.api import code_shape, same_code, shape_difference


def gelu_tanh(x):
    return act(x, approximate="tanh")  # noqa: F821 - compared, never called


def gelu_exact(x):
    return act(x, approximate="none")  # noqa: F821


def last_dim(x):
    return x.sum(dim=-1)


def first_dim(x):
    return x.sum(dim=1)


def true_dim(x):
    return x.sum(dim=True)  # 1 == True in Python; not the same constant


def last_dim_documented(x):
    """Only a docstring more."""
    return x.sum(dim=-1)


def default_tanh(x, approximate="tanh"):
    return act(x, approximate)  # noqa: F821


def default_none(x, approximate="none"):
    return act(x, approximate)  # noqa: F821


def nested(x):
    return [v * 2 for v in x]


def nested_other(x):
    return [v * 3 for v in x]


def test_a_changed_string_argument_is_another_shape():
    assert not same_code(gelu_tanh, gelu_exact)
    assert "LOAD_CONST 'tanh'" in shape_difference(gelu_tanh, gelu_exact)


def test_a_changed_constant_with_the_same_bytecode_is_another_shape():
    assert last_dim.__code__.co_code == first_dim.__code__.co_code
    assert not same_code(last_dim, first_dim)
    assert not same_code(first_dim, true_dim)
    assert "LOAD_CONST -1" in shape_difference(last_dim, first_dim)


def test_the_docstring_is_left_out():
    assert same_code(last_dim, last_dim_documented)
    assert shape_difference(last_dim, last_dim_documented) is None


def test_defaults_and_nested_code_count():
    assert not same_code(default_tanh, default_none)
    assert shape_difference(default_tanh, default_none) == "argument defaults differ"
    assert not same_code(nested, nested_other)


def test_wrapped_functions_are_unwrapped_and_builtins_have_no_shape():
    @functools.wraps(last_dim)
    def wrapper(*args):
        return last_dim(*args)

    assert same_code(wrapper, last_dim)
    assert code_shape(len) is None and code_shape(None) is None
    assert not same_code(len, len)
    assert shape_difference(len, last_dim) == "no Python code to compare"
