"""pytest plugin for the service tests (`pytest_plugins = ["service_plugin"]`): the fixture repository."""

from __future__ import annotations

from pathlib import Path

import pytest
from service_fixtures import cached_repository


@pytest.fixture(scope="session")
def service_repo(request: pytest.FixtureRequest) -> Path:
    """The tiny model repository, built once and kept in pytest's cache directory (tests only read it)."""
    return cached_repository(Path(request.config.cache.mkdir("imgcls-service-fixture")))
