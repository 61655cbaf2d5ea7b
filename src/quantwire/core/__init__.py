"""TorchScript-compatible building blocks of quantizers, each a small module with one job.

``quant`` (what quantizes), ``scaling`` (where the scale comes from), ``stats`` (statistics it
is derived from), ``zero_point``, ``bit_width``, ``restrict_val`` (powers of two, log domain)
and ``function_wrapper`` (rounding, clamping, views). Quantizers wire them by name.
"""
