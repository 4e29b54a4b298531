"""Long-running stream consumers (one process each): broker trade updates."""
