"""Measuring on a device: probes, the CUDA-graph timer, the timing modes, error metrics,
telemetry, the machine check, hardware facts.
"""
