"""The Ray Serve actuator against a fake dashboard: each pool of a disaggregated model is its own deployment, read
and scaled apart from the proxy in front of it."""

from __future__ import annotations

import httpx
import pytest

from herd.platform.controlplane.actuators import ServeActuator


def _deployment(target, *states):
    return {"target_num_replicas": target, "replicas": [{"state": s} for s in states]}


DETAILS = {"applications": {
    "scout": {"deployments": {"scout": _deployment(1, "RUNNING"),
                              "scout-prefill": _deployment(2, "RUNNING", "STARTING"),
                              "scout-decode": _deployment(3, "RUNNING", "RUNNING", "RECOVERING")}},
    "maverick": {"deployments": {"maverick": _deployment(2, "RUNNING", "RUNNING")}},
}}


@pytest.fixture
def dashboard():
    posted = []

    def handler(request):
        if request.method == "GET":
            assert request.url.path == "/api/serve/applications/"
            return httpx.Response(200, json=DETAILS)
        posted.append((request.url.path, request.read()))
        return httpx.Response(200, json={})

    return ServeActuator("127.0.0.1:8265", transport=httpx.MockTransport(handler)), posted


def test_each_pool_is_scaled_through_its_own_deployment(dashboard):
    actuator, posted = dashboard
    actuator.scale("scout", 4, "scout-decode")
    actuator.scale("scout", 2, "scout-prefill")
    actuator.scale("maverick", 3)
    assert [path for path, _ in posted] == ["/api/v1/applications/scout/deployments/scout-decode/scale",
                                            "/api/v1/applications/scout/deployments/scout-prefill/scale",
                                            "/api/v1/applications/maverick/deployments/maverick/scale"]
    assert posted[0][1] == b'{"target_num_replicas":4}'


def test_each_pool_reads_its_own_replicas_not_the_applications_sum(dashboard):
    actuator, _ = dashboard
    prefill, decode = actuator.status("scout", "scout-prefill"), actuator.status("scout", "scout-decode")
    assert (prefill.target, prefill.ready, prefill.starting) == (2, 1, 1)
    assert (decode.target, decode.ready, decode.starting) == (3, 2, 1)
    maverick = actuator.status("maverick")
    assert (maverick.target, maverick.ready) == (2, 2), "a colocated model: its one deployment, as before"
    with pytest.raises(RuntimeError, match="no deployment 'scout-decode' in application 'maverick'"):
        actuator.status("maverick", "scout-decode")


def test_a_refused_scale_says_which_deployment():
    actuator = ServeActuator("http://dash", transport=httpx.MockTransport(lambda r: httpx.Response(404, text="no")))
    with pytest.raises(RuntimeError, match="scout/scout-prefill to 2: 404"):
        actuator.scale("scout", 2, "scout-prefill")
