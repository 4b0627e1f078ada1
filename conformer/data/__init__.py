"""Data pipeline: sources (sources.py), transforms, RandAugment, erasing, Mixup/CutMix, sharding samplers and the
DataModule (module.py) that assembles them into MindSpore datasets per rank."""
