"""The attentions' and the depthwise convolution's kernels (importable as `sana_jax.kernels`)."""

if __name__ == "kernels":
    # Imported as top-level `kernels` because the repository root is on sys.path (`python -m ...` run there):
    # this folder then hides the installed `kernels` distribution, which transformers imports. Hand that import
    # the installed package; without one, `kernels` stays this folder, as before.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _paths = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _paths)
    if _spec is not None and _spec.loader is not None:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module
        _spec.loader.exec_module(_module)
else:
    from sana_jax.kernels.cross_attention import cross_attention, cross_attention_xla
    from sana_jax.kernels.depthwise_conv import depthwise_conv3x3, gated_depthwise_conv3x3, native_unsupported
    from sana_jax.kernels.linear_attention import linear_attention, linear_attention_xla, triton_unsupported

    __all__ = ["cross_attention", "cross_attention_xla", "depthwise_conv3x3", "gated_depthwise_conv3x3",
               "linear_attention", "linear_attention_xla", "native_unsupported", "triton_unsupported"]
