"""The in-process tiny replica of the gateway's tests, for the batch runner's."""

from tests.unit.platform.gateway.conftest import core, tiny_path  # noqa: F401
