"""Shared fixtures: the physics of every built-in gas, built once per test session (about a second)."""

from collections.abc import Mapping

import pytest

from smartgas_common.content import GasModel, build_models
from smartgas_common.gas import BUILTIN_GASES


@pytest.fixture(scope="session")
def models() -> Mapping[str, GasModel]:
    return build_models(BUILTIN_GASES.values())
