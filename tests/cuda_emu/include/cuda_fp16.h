// Stand-in for the CUDA toolkit header in tests/cuda_emu: the emulated subset lives in cuda_shim.h.
#pragma once
#include "../cuda_shim.h"
