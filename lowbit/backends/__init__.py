"""Backends: one subpackage per target, a registry, a Backend protocol."""
