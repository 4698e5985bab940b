"""MobileOneBlock and SEBlock: forward, training step, errors, properties, precision."""
