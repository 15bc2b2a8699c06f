"""Weight quantization, one layer at a time: grids (how a value is rounded), second-order error compensation
(GPTQ-style, shared by every grid), trit-planes, and packed storage through safetensors.
Submodules are imported on use."""
