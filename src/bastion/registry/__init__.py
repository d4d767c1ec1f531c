"""The control plane's SQL state: tenants, API keys, models and versions."""
