"""smaso: soft max-affine spline operators.

A small PyTorch package implementing Balestriero & Baraniuk, "From Hard to Soft:
Understanding Deep Network Nonlinearities via Vector Quantization and Statistical
Inference" (ICLR 2019).
"""

__version__ = "0.1.0"
