"""Runtime pieces the compiled module is made of (built on torch.distributed)."""
