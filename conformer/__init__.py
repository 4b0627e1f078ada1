"""Conformer on MindSpore: a Hydra-driven experiment framework (see README.md).

Importing the package applies the process defaults MindSpore needs (`conformer.runtime.process_defaults`) and
registers the `${project_root:}` config resolver (`conformer.runtime.paths`).
"""
from conformer.runtime import process_defaults  # noqa: F401  (before anything imports MindSpore)
from conformer.runtime.paths import register_resolvers

register_resolvers()
