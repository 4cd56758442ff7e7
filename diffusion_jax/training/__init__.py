"""Training: state, losses, optimizer, the jitted step and the trainer loop."""
