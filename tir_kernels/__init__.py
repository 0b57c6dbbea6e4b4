"""Hand-written TIR kernels with their constants: attention (CPU and GPU forms), the bfloat16 column-pair GEMM
and the VNNI quantized GEMM. They take plain numbers, never a config; frontend/ builds the model from them."""
