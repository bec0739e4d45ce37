"""quantbridge's own INT4 kernels: the torch reference (int4_reference) and the native kernel (int4_triton:
launches and layers; int4_tuner, int4_configs, int4_settings, int4_wgmma, int4_kernels). Import submodules directly."""
