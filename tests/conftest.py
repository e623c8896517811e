"""Fixtures shared by every test module."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.helpers import Daemon, running_daemon


@pytest.fixture
async def daemon() -> AsyncIterator[Daemon]:
    """sandboxd with its default settings, in this test's trio run, on a free port."""
    async with running_daemon() as running:
        yield running
