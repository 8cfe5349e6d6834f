"""Training: the DPO loss, LoRA, preference pairs, optimizer, jitted steps, the loop, metrics and checkpoints."""
