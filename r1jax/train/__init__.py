"""Training: the shared train state, losses, pure update functions and their stage drivers."""
