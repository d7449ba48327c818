"""Training: the loop, EMA (ema.py), optimizer/LR, checkpoints (checkpoint.py: safetensors + JSON,
never pickles) and distributed setup. No process math lives here."""
