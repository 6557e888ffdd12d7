"""Graph rewrites (imported as ``spa.passes``): channel pruning and cleanup."""
