"""Integrations of mogile_middleware with web frameworks, one subpackage each."""
