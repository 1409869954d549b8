"""charred.models."""
