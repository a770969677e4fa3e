"""CPU schedules: pre-packed dense kernels and dlight-style TensorIR rules."""
