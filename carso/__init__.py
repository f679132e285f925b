"""Hybrid adversarial defences: the reference pipeline."""
