"""A model's Serve application carries the deployment's request router."""

from __future__ import annotations

import pytest

from herd.workers.serve_app import build_app


@pytest.mark.parametrize(("setting", "path"), [
    ("prefix", "herd.workers.request_routers.PrefixAwareRouter"),
    ("round_robin", "herd.workers.request_routers.RoundRobinRouter"),
    ("power_of_two", "ray.serve._private.request_router:PowerOfTwoChoicesRequestRouter"),  # Serve's default
])
def test_the_request_router_setting_reaches_serve(setting: str, path: str) -> None:
    app = build_app({"deployment": {"request_router": setting, "prefix_imbalance_requests": 5}})
    config = app._bound_deployment._deployment_config.request_router_config  # what Serve sends to every handle
    assert config.request_router_class == path
    assert config.get_request_router_class().__name__ == path.replace(":", ".").rsplit(".", 1)[1]  # Serve's copy
    assert config.request_router_kwargs == ({} if setting == "power_of_two" else {"imbalance_requests": 5})
