"""charred.trainers."""
