"""Training: the Accelerate-driven trainer (the only package part that imports accelerate), checkpoints, signals."""
