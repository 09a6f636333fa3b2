"""The ingress of a disaggregated model: each request prefilled on one pool, generated on another.

With ReplicaConfig.disaggregation the model's Serve application is this proxy (named as the model, so the gateway's
handle and Serve's gRPC proxy reach it as they reach a ModelReplica: `generate`, `Generate`, `model_card`,
`stats`) bound to two ModelReplica deployments, "<model>-prefill" and "<model>-decode", with their own replica
counts. A request goes to a prefill replica, which runs its prompt and puts the prompt's KV on the KV transport
(herd.workers.kv_handoff), then to a decode replica, which imports that KV and streams the request's chunks back
through here unchanged: the gateway's request path and usage are those of a colocated model. A request a prefill
cannot serve apart (images, prompt logprobs) goes to the decode pool alone, and so does one whose prefill failed
(counted as a fallback): the decode replica then computes the prompt itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any, cast

import grpc
from ray import serve
from ray.serve.exceptions import BackPressureError
from ray.serve.grpc_util import RayServegRPCContext
from ray.serve.handle import DeploymentHandle

from herd.engine.errors import Code, HerdError
from herd.protos.herd.v1 import inference_pb2 as pb
from herd.workers.kv_transport import Prefilled
from herd.workers.model_replica import ModelReplica
from herd.workers.prefill_request import colocated_reason
from herd.workers.process_setup import ProcessSetup
from herd.workers.replica_config import POOLS, ReplicaArgs, pool_deployment

log = logging.getLogger(__name__)

COUNTS = ("pd_requests", "pd_prefilled", "pd_colocated", "pd_fallbacks", "pd_blocks_moved", "pd_bytes_moved")
"""The proxy's counters since it started: requests; those prefilled apart, those sent to the decode pool alone
(images, prompt logprobs) and those whose prefill failed; prompt blocks and bytes the prefills exported."""


@serve.deployment
class PDProxy:
    """Prefill on one pool, decode on the other, for one model."""

    def __init__(self, prefill: DeploymentHandle[Any], decode: DeploymentHandle[Any], name: str) -> None:
        self.prefill_pool = prefill
        self.decode_pool = decode
        self.name = name
        self.counts = dict.fromkeys(COUNTS, 0)

    async def generate(self, request: bytes) -> AsyncIterator[bytes]:
        """Serialized GenerateRequest in, the decode replica's serialized GenerateChunks out."""
        prefilled = await self._prefill(request)
        stream: Any = self.decode_pool.options(stream=True).generate_with_kv.remote(request, prefilled)
        finished = False
        try:
            async for data in stream:
                yield data
            finished = True
        except BackPressureError:
            raise HerdError(Code.RESOURCE_EXHAUSTED, f"the decode pool of {self.name} is at capacity",
                            retry_after_s=1) from None
        except HerdError as err:  # Ray's subclass of the decode replica's error: passed on as a plain one
            raise HerdError(err.code, err.message, param=err.param, reason=err.reason,
                            retry_after_s=err.retry_after_s) from None
        finally:
            if not finished:  # the client left (or the stream failed): the decode replica stops the request
                with contextlib.suppress(Exception):
                    stream.cancel()

    async def Generate(self, request: pb.GenerateRequest,
                       grpc_context: RayServegRPCContext | None = None) -> AsyncIterator[pb.GenerateChunk]:
        """The same under the RPC's name, for Serve's gRPC proxy (a refusal keeps its code, as ModelReplica's)."""
        try:
            async for data in self.generate(request.SerializeToString()):
                yield pb.GenerateChunk.FromString(data)
        except HerdError as err:
            if grpc_context is not None:
                grpc_context.set_code(getattr(grpc.StatusCode, err.code.value))
                grpc_context.set_details(err.message)
            raise

    async def model_card(self) -> bytes:
        card: bytes = await self.decode_pool.model_card.remote()
        return card

    async def stats(self) -> dict[str, int]:
        """A decode replica's stats, a prefill replica's (prefixed prefill_), and the proxy's counters."""
        decode, prefill = await asyncio.gather(self.decode_pool.stats.remote(), self.prefill_pool.stats.remote())
        return {**decode, **{f"prefill_{key}": value for key, value in prefill.items()}, **self.counts}

    async def config(self) -> dict[str, Any]:
        """What a decode replica runs (ModelReplica.config)."""
        config: dict[str, Any] = await self.decode_pool.config.remote()
        return config

    async def _prefill(self, request: bytes) -> Prefilled | None:
        """The request prefilled on the prefill pool, or None: it goes to the decode pool alone."""
        self.counts["pd_requests"] += 1
        if colocated_reason(pb.GenerateRequest.FromString(request)) is not None:
            self.counts["pd_colocated"] += 1
            return None
        try:
            prefilled: Prefilled = await self.prefill_pool.prefill.remote(request)
        except Exception as err:  # a refusal, a full pool, a replica gone: the decode replica computes the prompt
            self.counts["pd_fallbacks"] += 1
            log.warning("%s: prefill failed (%s: %s); the decode pool computes the prompt", self.name,
                        type(err).__name__, str(err)[:500])
            return None
        self.counts["pd_prefilled"] += 1
        self.counts["pd_blocks_moved"] += prefilled.blocks
        self.counts["pd_bytes_moved"] += prefilled.nbytes
        return prefilled


def disaggregated_app(config: ReplicaArgs, options: dict[str, Any], process_setup: ProcessSetup | None,
                      ) -> serve.Application:
    """A disaggregated model's application: the proxy (the model's name, deployment.num_replicas of it) bound to its
    prefill and decode deployments of ModelReplica, each with the model's replica `options` (build_app's) under its
    own name and replica count. Only the proxies queue (max_queued_requests; past it 429); each admits as many
    requests as the decode pool runs at once."""
    assert config.disaggregation is not None
    pd = config.disaggregation
    replica = cast(serve.Deployment, ModelReplica)  # @serve.deployment made the class a Deployment
    pools = {}
    for role in POOLS:
        replicas = pd.prefill_replicas if role == "prefill" else pd.decode_replicas
        pool = {key: value for key, value in options.items() if key != "autoscaling_config"}
        pool |= {"name": pool_deployment(config.name, role), "num_replicas": replicas, "max_queued_requests": -1}
        pools[role] = replica.options(**pool).bind(config.model_dump(mode="json"), process_setup)
    proxy = cast(serve.Deployment, PDProxy)
    return proxy.options(
        name=config.name, num_replicas=config.deployment.num_replicas,
        max_ongoing_requests=options["max_ongoing_requests"] * pd.decode_replicas,
        max_queued_requests=options["max_queued_requests"],
        graceful_shutdown_timeout_s=options["graceful_shutdown_timeout_s"],
        health_check_period_s=options["health_check_period_s"], ray_actor_options={"num_cpus": 0},
    ).bind(pools["prefill"], pools["decode"], config.name)


__all__ = ["COUNTS", "PDProxy", "disaggregated_app"]
