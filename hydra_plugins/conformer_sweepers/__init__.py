"""Hydra plugins of this project (found by Hydra's plugin scan of the `hydra_plugins` namespace package)."""
