"""Renderers of saved comparisons: terminal tables now; markdown and HTML read the same schema."""
