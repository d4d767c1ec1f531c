"""The control plane: registry, keys and snapshot publishing, behind an admin API on its own port."""
