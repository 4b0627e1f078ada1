"""Conformer on MindSpore: a Hydra-driven experiment framework (see README.md).

Importing the package sets two process defaults that must precede MindSpore's first use, for run.py, tests and
library users alike (an explicit value in the environment wins):
- ONEDNN_MAX_CPU_ISA=AVX2: on AVX-512/AMX CPUs oneDNN otherwise picks a ~90x slower reference convolution;
- GLOG_v=3: MindSpore's C++ warnings drown the progress lines on the CPU (on GPU and Ascend, where its warnings
  are what a user bringing up a machine needs, `conformer.hardware` lowers it to 2 unless the user set it).
It also registers the `${project_root:}` config resolver (conformer.paths).
"""
import os

os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")
GLOG_V_FROM_USER = "GLOG_v" in os.environ
os.environ.setdefault("GLOG_v", "3")

from conformer.paths import register_resolvers  # noqa: E402

register_resolvers()
