"""Training: the compiled train step (step.py), EMA weights (ema.py), checkpoints and the training loop."""
