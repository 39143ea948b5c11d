"""Written for plugin API 2.0: must be skipped, never imported."""
raise AssertionError("an incompatible extension was imported")
