"""fusedformer.kernels: the op layer.

One module per op family (attention, softmax, layer_norm, ffn: Triton kernels and their
launchers), the plain-PyTorch oracle (reference), the backend choice (dispatch) and the
autograd + torch.library registration that every backend shares (ops). Nothing here imports
fusedformer's model layer, and nothing heavy runs at import: Triton and the C++ extension are
loaded on first use.
"""
from .dispatch import available_backends, backend_status, get_backend, set_backend, use_backend
from .ops import ffn, layer_norm, scaled_dot_product_attention, scaled_masked_softmax

__all__ = [
    "available_backends",
    "backend_status",
    "ffn",
    "get_backend",
    "layer_norm",
    "scaled_dot_product_attention",
    "scaled_masked_softmax",
    "set_backend",
    "use_backend",
]
