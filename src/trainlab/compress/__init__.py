"""Compression: plans (what each layer gets), allocators (how much per layer), compressors, masks,
calibration, recovery and export. Submodules are imported on use, so importing this package is cheap."""
