"""charred: character-aware text-to-image diffusion in JAX."""
