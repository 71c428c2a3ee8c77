"""xnorcdl: conditionally deep hybrid neural networks across edge and cloud.

The edge runs a stem and M quantized (1, 2 or 4-bit) convolutions with early exits; samples whose
exit entropy is below its threshold stop there, the others continue through float32 cloud layers
(Long, Chakraborty, Roy, "Conditionally Deep Hybrid Neural Networks Across Edge and Cloud").
"""
__version__ = "0.1.0"
