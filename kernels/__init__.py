"""fusedformer.kernels: the op layer.

One module per op family (attention, softmax, layer_norm, ffn: Triton kernels and their
launchers), the plain-PyTorch oracle (reference), the backend choice (dispatch) and the
autograd + torch.library registration that every backend shares (ops). Nothing here imports
fusedformer's model layer, and nothing heavy runs at import: Triton and the C++ extension are
loaded on first use.

Imported under any other name (a top-level `kernels`, which is what a checkout's root on
sys.path offers: `python -m ...` run from the repository root, and transformers probes
`import kernels` for Hugging Face's package of that name), this folder stays inert. Loading .ops
a second time would re-register the `fusedformer::` custom ops, and torch frees the first
registration under the OpOverloads that the real fusedformer.kernels still calls: a
use-after-free (found with ASan: transformers.integrations.hub_kernels -> import kernels).
"""
if __name__ == "fusedformer.kernels":
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
