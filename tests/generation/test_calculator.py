"""The calculator tool (spec §3.3) as a safe AST interpreter: nanochat's results, nothing else ever runs."""

from __future__ import annotations

import ast
import builtins
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modeling_nanochat.generation_nanochat import use_calculator


@pytest.mark.parametrize("expression, expected", [
    ("12/60", 0.2),  # nanochat renders str(result): "0.2"
    ("1,234 + 5", 1239),  # commas are removed first
    ("(2 + 3) * 4", 20),
    ("7 // 2", 3),
    ("7 % 3", 1),
    ("-5 + 2", -3),
    ("--5", 5),
    ("+4", 4),
    ("3.5 * 2", 7.0),
    ("10 - 2 - 3", 5),
    ("'strawberry'.count('r')", 3),
    ('"banana".count("an")', 2),
    ("'strawberry'.count('r') * 2 + 1", 7),
    ("  42  ", 42),
])
def test_results_match_python_arithmetic(expression, expected):
    result = use_calculator(expression)
    assert result == expected and type(result) is type(expected)


@pytest.mark.parametrize("expression", [
    "2**10", "2 ** 10", "pow(2, 10)", "abs(-1)", "x + 1", "__import__('os').system('true')",
    "open('/etc/passwd').read()", "().__class__.__bases__[0].__subclasses__()", "'a'.__class__",
    "'abc'.upper()", "'a'.count", "'aaa'.count(x='a')", "'aaa'.count(1)", "'abc'", "[1, 2]", "{1: 2}", "(1, 2)",
    "lambda: 1", "True + 1", "None", "1 if 1 else 2", "1 < 2", "1 and 2", "~1", "1 << 100", "1 | 2", "f'{1}'",
    "1/0", "1 // 0", "1 % 0", "1e308 * 10", "'a' * 3", "'a' + 'b'", "1 + 'a'", "", "   ", "1 +", "((1)",
    "9" * 400, "*".join(["9" * 200] * 3), "1" + "0" * 5000, "(" * 300 + "1" + ")" * 300, "-" * 500 + "1",
    "'" + "a" * 2000 + "'.count('a')", "1 + 1; import os", "import os", "exec('1')", "eval('1')",
    "2j", "1 @ 2", "[].count(1)", "b'aa'.count(b'a')", "'aa'.count('a', 0.5)", "'héllo'.count('l')", "µ",
])
def test_everything_else_is_refused(expression):
    assert guarded_calculator(expression) is None


def test_non_strings_are_refused():
    for value in (None, 12, b"1+1", ["1+1"]):
        assert use_calculator(value) is None


def test_big_products_are_refused_before_they_are_computed():
    start = time.perf_counter()
    huge = "*".join(["99999999999999999999"] * 60)  # ~4000 bits if it were evaluated
    assert use_calculator(huge) is None
    assert use_calculator("*".join(["9" * 100] * 3)) == int("9" * 100) ** 3  # ~1000 bits: fine
    assert time.perf_counter() - start < 0.5


def test_safe_in_threads_without_signals():
    results = []
    threads = [threading.Thread(target=lambda: results.append(use_calculator("6*7"))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [42] * 8


def guarded_calculator(expression):
    """use_calculator with eval/exec/__import__ (and compile beyond parsing) recording any call.

    The calculator swallows exceptions, so violations are recorded, not just raised."""
    violations = []
    real_compile = builtins.compile

    def forbidden(name):
        def call(*args, **kwargs):
            violations.append(name)
            raise RuntimeError(f"{name} called")
        return call

    def parse_only_compile(source, filename, mode, flags=0, *args, **kwargs):
        if not flags & ast.PyCF_ONLY_AST:  # ast.parse compiles to a tree only; anything else is execution
            violations.append("compile")
            raise RuntimeError("compile called")
        return real_compile(source, filename, mode, flags, *args, **kwargs)

    saved = {name: getattr(builtins, name) for name in ("eval", "exec", "compile", "__import__")}
    builtins.eval, builtins.exec, builtins.__import__ = forbidden("eval"), forbidden("exec"), forbidden("__import__")
    builtins.compile = parse_only_compile
    try:
        result = use_calculator(expression)
    finally:
        for name, value in saved.items():
            setattr(builtins, name, value)
    assert not violations, violations
    assert result is None or type(result) in (int, float)
    return result


FUZZ = settings(max_examples=300, deadline=None, database=None)  # no .hypothesis folder in the repo
ATOMS = st.sampled_from(["1", "2", "0", "7", "13", "3.5", "0.1", "99999999999999", "'ab'", "'abcab'.count('ab')",
                         "x", "__import__", "os", "open", "()", "[]", "__class__", "count", "'a'.count"])
OPERATORS = st.sampled_from([" + ", " - ", " * ", " / ", " // ", " % ", " ** ", ".", ",", "(", ")", " and ",
                             "[", "]", "-", "=", ";", "lambda:", " if ", "@", "<<"])


@FUZZ
@given(st.text(max_size=200))
def test_fuzz_arbitrary_text(text):
    guarded_calculator(text)


@FUZZ
@given(st.lists(st.one_of(ATOMS, OPERATORS), max_size=30))
def test_fuzz_token_soup(parts):
    guarded_calculator("".join(parts))


def arithmetic(depth=3):
    """Expressions whose every intermediate stays finite and small (no subnormals, |x| <= 1e6 leaves)."""
    floats = st.floats(1e-3, 1e6, allow_nan=False, allow_infinity=False, allow_subnormal=False)
    number = st.one_of(st.integers(-10**6, 10**6).map(str), floats.map(repr))
    if depth == 0:
        return number
    inner = arithmetic(depth - 1)
    return st.one_of(
        number,
        st.tuples(inner, st.sampled_from(["+", "-", "*", "/", "//", "%"]), inner).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        inner.map(lambda e: f"-{e}"),
    )


@FUZZ
@given(arithmetic())
def test_fuzz_arithmetic_agrees_with_python(expression):
    try:
        expected = eval(expression, {"__builtins__": {}}, {})  # the test's oracle, on generated arithmetic only
    except ZeroDivisionError:
        expected = None
    result = guarded_calculator(expression)
    assert result == expected and type(result) is type(expected)
