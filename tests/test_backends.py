"""The backend table: every named backend implements the executor interface under its name."""
import inspect

import pytest

from xnorcdl import backends
from xnorcdl.backends import Executor


@pytest.mark.parametrize("name", list(backends.BACKENDS))
def test_each_backend_implements_the_interface(name):
    cls = backends.get(name)
    assert cls.name == name
    for method in ("stem", "block", "exit", "head", "select"):
        want = list(inspect.signature(getattr(Executor, method)).parameters)
        got = list(inspect.signature(getattr(cls, method)).parameters)
        assert len(got) == len(want), f"{name}.{method}{tuple(got)}"


def test_unknown_backend_is_one_clear_error():
    with pytest.raises(backends.BackendError, match="--backend: expected one of fast, reference"):
        backends.get("gpu")
