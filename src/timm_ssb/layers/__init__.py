"""Reusable sampling layers: separable sampling matrices and the samplers built on them."""

from .samplers import (
    SAMPLERS,
    AdaptiveSampler,
    BilinearSampler,
    DConvSampler,
    GaussianSampler,
    MatrixSampler,
    SpatialSampler,
    UniformSampler,
    create_sampler,
)
from .sampling_matrices import (
    SamplingMatrices,
    adaptive_matrices,
    adaptive_positions,
    bilinear_matrices,
    gaussian_matrices,
    resample,
    resample_nhwc,
    resample_reference,
    resample_residual,
    saliency_positions,
    separable_matrices,
    uniform_matrices,
)
