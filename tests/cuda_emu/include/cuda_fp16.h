// Stands in for CUDA's <cuda_fp16.h> when `tests/cuda_emu` compiles `cuda_decode.cu` on the
// CPU (with `-I tests/cuda_emu/include`): the types and functions come from the shim.
#pragma once
#include "../shim.h"
