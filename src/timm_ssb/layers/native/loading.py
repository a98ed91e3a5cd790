"""Load a native kernel once, remember why it could not be, say so once.

The C++ library (:mod:`.cpu.build`) and the Triton kernels (:mod:`.triton`) are optional at run time: a missing
compiler or Triton means PyTorch's path, not an error. Each is one :class:`KernelLoader`.
"""

import warnings
from typing import Callable, Generic, Optional, TypeVar

__all__ = ['KernelLoader']

T = TypeVar('T')


class KernelLoader(Generic[T]):
    """``load()`` once; a failure is remembered (not retried in the process) as :attr:`error`, its one-line
    ``'Type: message'``, and warned about once, the first time a caller asks with ``warn``.

    Args:
        name: what is loaded, as errors and warnings name it (``'native CPU sampling kernels'``).
        load: builds or imports the kernels; raises on failure; its result is :attr:`value`.
        warning: the warning's text from the error (what happens instead, what to do).
    """

    def __init__(self, name: str, load: Callable[[], T], warning: Callable[[str], str]) -> None:
        self.name = name
        self._load = load
        self._warning = warning
        self.value: Optional[T] = None
        self.error: Optional[str] = None
        self._loaded = False
        self._warned = False

    def __call__(self, warn: bool = False) -> bool:
        """Whether the kernels are loaded (loading them the first time); with ``warn``, a failure warns once."""
        if not self._loaded and self.error is None:
            try:
                self.value = self._load()
                self._loaded = True
            except Exception as e:  # a missing compiler or Triton, a failed build or import: all mean "use PyTorch"
                self.error = f'{type(e).__name__}: {e}'.strip().splitlines()[0]
        if self.error is not None and warn and not self._warned:
            self._warned = True
            warnings.warn(self._warning(self.error), RuntimeWarning, stacklevel=3)
        return self._loaded

    def require(self) -> T:
        """The loaded kernels; a ``RuntimeError`` naming why where they could not be loaded."""
        if not self():
            raise RuntimeError(f'timm_ssb: the {self.name} are not available ({self.error}); see `timm-ssb info`')
        return self.value

    def forget(self) -> None:
        """Forget the outcome, so that the next call tries again (tests)."""
        self.value, self.error, self._loaded, self._warned = None, None, False, False
