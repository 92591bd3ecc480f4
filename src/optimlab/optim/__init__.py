"""Drop-in ``torch.optim.Optimizer`` implementations, one file per method."""
