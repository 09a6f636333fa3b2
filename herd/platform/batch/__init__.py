"""The durable Batch API and its Files: JSONL requests run at batch priority through the gateway's request path."""
