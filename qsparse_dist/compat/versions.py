"""Which megatron-core / DeepSpeed releases the patches in :mod:`qsparse_dist.compat` were written for.

A patch of a private API is only known to be right for the release series it was measured on
(``0.16`` → ``0.16.x``).  :func:`require` is called by every patch before it touches the library and
raises :class:`CompatError` naming the package, the installed version and the supported series, so
a newer library fails with one clear line instead of a silent wrong result deep in a step.
"""

from __future__ import annotations

import functools
import importlib.metadata
import re

__all__ = ["SUPPORTED", "CompatError", "check_version", "installed_version", "require"]

SUPPORTED: dict[str, str] = {"megatron-core": "0.16", "deepspeed": "0.19"}
"""Distribution name → release series (``major.minor``) the patches were written for."""


class CompatError(RuntimeError):
    """An installed megatron-core / DeepSpeed release the compat patches were not written for."""


def _series(version: str) -> tuple[int, ...] | None:
    m = re.match(r"\s*v?(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else None


def check_version(package: str, found: str, written_for: str, patch: str) -> None:
    """Raise :class:`CompatError` unless ``found`` (e.g. ``"0.16.1+abc"``) is in the ``written_for``
    release series (``"0.16"`` accepts every ``0.16.x``)."""
    want = _series(written_for)
    if want is None:
        raise ValueError(f"written_for={written_for!r} is not a 'major.minor' series")
    if _series(found) != want:
        raise CompatError(
            f"qsparse_dist.compat: the patch '{patch}' was written for {package} {written_for}.x, but "
            f"{package} {found} is installed; install {package}=={written_for}.* (the version pyproject.toml "
            f"and the constraints file pin) or port the patch in qsparse_dist/compat/"
        )


@functools.cache
def installed_version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        raise CompatError(f"qsparse_dist.compat: {package} is not installed "
                          f"(needs {package}=={SUPPORTED.get(package, '?')}.*)") from None


def require(package: str, patch: str) -> None:
    """Guard of one patch: the installed ``package`` must be the series in :data:`SUPPORTED`."""
    check_version(package, installed_version(package), SUPPORTED[package], patch)
