"""Loading what is compared: local directories, hub ids, the demo (SmolLM2 GGUF), tiny and seeded
models, GGUF files, quantized checkpoints, the shipped text, the quantized-weights cache.
"""
