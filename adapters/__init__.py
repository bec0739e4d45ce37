"""Backend adapters: one module per backend, each registering itself with quantbridge.plugin.backend."""
