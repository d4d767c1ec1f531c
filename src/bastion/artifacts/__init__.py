"""Model artifacts: a content-addressed store and the checks an upload must pass."""
