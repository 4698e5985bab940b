"""PyTorch tools around the blocks: DDP, threads, hooks."""
