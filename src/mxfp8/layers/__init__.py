"""mxfp8.layers: recipes, GEMM backends, MXLinear and convert_model.

- ``recipe.py``: :class:`Recipe` (frozen, validated), the named presets, dict/TOML round-trip.
- ``gemm.py``: GEMM backends (``emulated``, ``scaled_mm``) and the cuBLAS block-scale layout.
- ``mx_function.py``: the 3-GEMM autograd Function for MX recipes.
- ``tensorwise_function.py``: the per-tensor (current / delayed) FP8 Function and its state.
- ``linear.py``: :class:`MXLinear`, the drop-in ``nn.Linear`` (telemetry hook documented there).
- ``convert.py``: :func:`convert_model`, the conversion report, delayed-scaling checkpoints.

Submodules are imported on use (``mxfp8.MXLinear`` resolves lazily), so importing the
package stays cheap.
"""
