"""What adapters implement, and nothing else: the spec, Int4Weight, Quantizer, Kernel with the one
priority list and chooser, the backend kinds, the registries, errors. A leaf: it imports no other part.
"""
