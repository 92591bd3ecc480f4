"""Wrappers that transform gradients in front of any ``torch.optim.Optimizer``."""
