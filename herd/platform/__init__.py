"""Gateway (HTTP + gRPC), tenancy, control plane and telemetry."""
