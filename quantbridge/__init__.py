"""quantbridge: the same model, the same inputs, every INT4 backend — per layer, measured honestly."""

__version__ = "0.1.0"
