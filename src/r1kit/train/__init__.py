"""Training: the loop, its schedule, checkpoints that resume exactly, and scale-out on torch.distributed."""
