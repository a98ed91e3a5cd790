"""Where the sampling's softmaxes cut their tails to exact zeros: one fact for every implementation.

The PyTorch reference (:mod:`.sampling_matrices`) reads these constants, the Triton kernels take them as
``constexpr`` and the C++ kernels are compiled with them (:func:`.native.cpu.build.cflags`), so the three cannot
drift apart. (TorchScript cannot read float globals: the reference's functions take them as default arguments.)
"""

__all__ = ['SMALLEST_WEIGHT_LOG', 'KERNEL_WEIGHT_LOG']

SMALLEST_WEIGHT_LOG = -50.0
"""Softmax weights below ``exp(-50)`` (~2e-22) of their row's largest are set to exactly zero (the default of
:func:`.sampling_matrices.tailless_softmax`, used for the saliency positions; the sampling kernels cut tighter, at
:data:`KERNEL_WEIGHT_LOG`).

A Gaussian's far tail underflows into subnormal floats (~1e-40); on Intel CPUs every multiply with a
subnormal takes a microcode assist, and the sampling products ran up to ten times slower. Cutting the tail
at 2e-22 of the peak leaves no subnormal weight, and keeps the products of the remaining weights with
activations above ~1e-16 in magnitude normal; it changes results by less than 1e-21 relative."""


KERNEL_WEIGHT_LOG = -18.0
"""The Gaussian sampling kernels' weights below ``exp(-18)`` (~1.5e-8) of their row's largest are set to zero.

That keeps the taps within ~6 sigma of each sample: a band of a few input pixels per output (11 of layer2's 28
rows when sampling 28 -> 16), which the native kernel reads instead of the whole axis. It changes results by
less than 1e-7 relative (the weights dropped sum to less than that); the saliency positions keep the wider
:data:`SMALLEST_WEIGHT_LOG` cut."""
