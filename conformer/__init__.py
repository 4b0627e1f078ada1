"""Conformer on MindSpore: a Hydra-driven experiment framework (see README.md).

Importing the package sets two process defaults that must precede MindSpore's first use, for run.py, tests and
library users alike (an explicit value in the environment wins):
- ONEDNN_MAX_CPU_ISA=AVX2: on AVX-512/AMX CPUs oneDNN otherwise picks a ~90x slower reference convolution;
- GLOG_v=3: MindSpore's C++ warnings drown the progress lines.
It also registers the `${project_root:}` config resolver (conformer.paths).
"""
import os

os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")
os.environ.setdefault("GLOG_v", "3")

from conformer.paths import register_resolvers  # noqa: E402

register_resolvers()
