"""Process defaults that must precede MindSpore's first use (an explicit value in the environment wins); applied
when `conformer` is imported, for run.py, tests and library users alike:
- ONEDNN_MAX_CPU_ISA=AVX2: on AVX-512/AMX CPUs oneDNN otherwise picks a ~90x slower reference convolution;
- GLOG_v=3: MindSpore's C++ warnings drown the progress lines on the CPU (on GPU and Ascend, where its warnings
  are what a user bringing up a machine needs, `conformer.runtime.hardware` lowers it to 2 unless the user set it).
"""
import os

os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")
GLOG_V_FROM_USER = "GLOG_v" in os.environ
os.environ.setdefault("GLOG_v", "3")
