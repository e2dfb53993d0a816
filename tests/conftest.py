"""Shared pytest configuration.

Mutation testing: with the environment variable ``CNNGP_MUTANT`` set to a name from
``tests/mutants.py``, a deliberately wrong formula is patched into the library for the whole session
(see ``tests/mutation_check.py``). Unset (the normal case) this does nothing.
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def _cnngp_mutant():
    name = os.environ.get("CNNGP_MUTANT", "").strip()
    if not name:
        yield None
        return
    import mutants

    with pytest.MonkeyPatch.context() as mp:
        mutants.apply(name, mp)
        yield name


def pytest_report_header(config):
    name = os.environ.get("CNNGP_MUTANT", "").strip()
    return f"CNNGP_MUTANT={name} (a deliberately wrong library formula is patched in)" if name else None
