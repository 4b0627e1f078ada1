"""The names and choices several parts of the project share: plain data, imported by anything, importing nothing.

Each rule about these values lives beside the component that applies it; this module only spells the vocabulary.
"""
from __future__ import annotations

# The tasks (`task=<name>`, conf/task/<name>.yaml) and the function that runs each: the one list of them.
TASKS = {"train": "conformer.tasks.train:train", "eval": "conformer.tasks.eval:evaluate",
         "export": "conformer.tasks.export:export", "predict": "conformer.tasks.predict:predict",
         "preflight": "conformer.tasks.preflight:preflight"}
AMP_LEVELS = ("O0", "O1", "O2", "O3")
PROGRESS_BAR_SETTINGS = ("auto", True, False)
LOSS_SCALES = ("none", "static", "dynamic")
DEVICE_TARGETS = ("CPU", "GPU", "Ascend")
MODES = ("graph", "pynative")
BACKENDS = {"CPU": "mccl", "GPU": "nccl", "Ascend": "hccl"}  # MindSpore's collective library per device
PARALLEL_MODES = ("data_parallel",)
# hardware.jit_level per device (null: MindSpore's default): O2 is CANN's GraphEngine, Ascend only
JIT_LEVELS = {"CPU": ("O0", "O1"), "GPU": ("O0", "O1"), "Ascend": ("O0", "O1", "O2")}
ASCEND_PRECISION_MODES = ("force_fp16", "allow_fp32_to_fp16", "allow_mix_precision", "must_keep_origin_dtype",
                          "force_fp32", "allow_fp32_to_bf16", "allow_mix_precision_fp16", "allow_mix_precision_bf16",
                          "force_lowerprecision")
ASCEND_OVERFLOW_MODES = ("INFNAN_MODE", "SATURATION_MODE")
EXPORT_SUFFIXES = {"MINDIR": ".mindir", "ONNX": ".onnx", "AIR": ".air"}
EXPORT_OUTPUTS = ("sum", "both")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
BAD_IMAGE_POLICIES = ("skip", "error")  # data.on_bad_image: what a corrupt or truncated image file does
CHECKPOINT_SUFFIXES = (".ckpt",)
OFFICIAL_SUFFIXES = (".pth", ".pt", ".tar", ".npz")  # official PyTorch weights, converted on load
MLFLOW_PREFIX = "mlflow:"
HEADS = ("conv", "trans", "sum")  # the two classifier heads and their sum (the prediction)
# What a training logs once per epoch, and so what trainer.monitor may name.
EPOCH_METRICS = ("val/loss", *(f"val/top{k}_{head}" for k in (1, 5) for head in HEADS), "train/loss_epoch",
                 "train/epoch", "time/epoch_s")
MONITOR_MODES = ("max", "min")
TAG_NAME = r"[\w./ -]+"  # what MLflow accepts as a tag key
# Keys of a model config that are not constructor arguments of the network.
MODEL_CONFIG_KEYS = ("_target_", "name", "pretrained", "pretrained_strict")
