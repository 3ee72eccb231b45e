"""phasestream."""
