"""The C++ kernels (:file:`resample.cpp`, :file:`matrices.cpp`), built at first use by :mod:`.build`, and what this CPU
is (:mod:`.features`)."""
