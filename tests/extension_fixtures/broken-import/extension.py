"""Fails at import: the loader must record the error and keep going."""
import atelier_module_that_does_not_exist  # noqa: F401
