"""Tenants, API keys, limits, quotas and the usage ledger."""
