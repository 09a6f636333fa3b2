"""Tests for herd.platform.tenancy."""
