"""The gateway: one request path (herd.platform.gateway.core) behind two front doors, OpenAI-compatible
HTTP (http_app) and gRPC herd.v1.Inference (grpc_server), over backends that reach model replicas."""
