// Shared, torch-free definitions for the C++ and CUDA kernels of fusedformer.
//
// Kernels see raw pointers, sizes, strides and (on the GPU) a cudaStream_t, packed in one
// small params struct per op (see <op>.h). Only csrc/bindings.cpp sees torch.
#pragma once

#include <cstdint>

namespace fusedformer {

// Storage dtype of the tensors of one op call. Math is always fp32.
enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

}  // namespace fusedformer
