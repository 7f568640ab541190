"""Releases the doctor may name in its advice, known without the network: the test matrix's pins.

Advice such as ``pip install 'peft>=X'`` must name a release that exists. The doctor never asks the package
index; what it knows is the table below, the transformers / peft / accelerate pins of each row of the library's
test matrix (the ``constraints/*.txt`` files of the repository; ``tests/test_doctor.py`` checks that the two
agree). A release needed but newer than every release known here is said to have no release yet.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

from packaging.version import Version

__all__ = ["KNOWN_AS_OF", "MATRIX_PINS", "MatrixPins", "install_advice", "known_release_at_least", "matrix_pins"]


class MatrixPins(NamedTuple):
    """One row of the test matrix: these three releases are installed together and tested there."""

    transformers: str
    peft: str
    accelerate: str


#: The pins of every matrix row (``constraints/<row>.txt``), oldest transformers first.
MATRIX_PINS = (
    MatrixPins("4.31.0", "0.4.0", "0.21.0"),
    MatrixPins("4.32.1", "0.5.0", "0.22.0"),
    MatrixPins("4.34.1", "0.5.0", "0.23.0"),
    MatrixPins("4.35.0", "0.5.0", "0.24.1"),
    MatrixPins("4.35.2", "0.6.2", "0.24.1"),
    MatrixPins("4.36.2", "0.7.1", "0.25.0"),
    MatrixPins("4.38.2", "0.9.0", "0.27.2"),
    MatrixPins("4.40.2", "0.10.0", "0.30.0"),
    MatrixPins("4.43.4", "0.12.0", "0.33.0"),
    MatrixPins("4.45.2", "0.13.0", "1.0.0"),
    MatrixPins("4.48.3", "0.14.0", "1.3.0"),
    MatrixPins("4.51.3", "0.15.1", "1.6.0"),
    MatrixPins("4.53.3", "0.16.0", "1.9.0"),
    MatrixPins("4.55.4", "0.17.1", "1.10.0"),
    MatrixPins("4.57.6", "0.18.1", "1.12.0"),
    MatrixPins("5.0.0", "0.18.1", "1.12.0"),
    MatrixPins("5.12.1", "0.19.1", "1.14.0"),
    MatrixPins("5.17.0", "0.20.0", "1.15.0"),
    MatrixPins("5.23.0", "0.21.2", "1.15.0"),
    MatrixPins("5.24.0", "0.21.2", "1.15.0"),
    MatrixPins("5.25.0", "0.21.2", "1.16.0"),
)

#: The newest row was resolved with the packages the index had on this day: "known" means known then.
KNOWN_AS_OF = "2026-12-02"


def matrix_pins(transformers: Optional[str]) -> Optional[MatrixPins]:
    """The row with the newest transformers at or below ``transformers`` (same major version), or ``None``.

    Args:
        transformers (`str`, *optional*): the installed transformers release.

    Returns:
        `MatrixPins` or `None`: the row whose pins are tested with the nearest release not newer than this one.
    """
    try:
        installed = Version(str(transformers))
    except Exception:  # noqa: BLE001 - no or an unreadable version: no row
        return None
    rows = [row for row in MATRIX_PINS if Version(row.transformers) <= installed]
    rows = [row for row in rows if Version(row.transformers).major == installed.major]
    return rows[-1] if rows else None


def _known(package: str) -> list:
    return sorted({Version(getattr(row, package)) for row in MATRIX_PINS})


def known_release_at_least(package: str, minimum: Version) -> Optional[str]:
    """The oldest release of ``package`` (``"peft"`` or ``"accelerate"``) in the table that is ``>= minimum``.

    Returns:
        `str` or `None`: ``None`` when every release known here is older than ``minimum``.
    """
    found = [release for release in _known(package) if release >= minimum]
    return str(found[0]) if found else None


def install_advice(package: str, minimum: Version) -> str:
    """``pip install '<package>>=<release>'`` naming a release that exists, or says there is none yet.

    Args:
        package (`str`): ``"peft"`` or ``"accelerate"``.
        minimum (`Version`): the release asked for (e.g. transformers' ``MIN_PEFT_VERSION``).
    """
    release = known_release_at_least(package, minimum)
    if release is not None:
        return f"pip install '{package}>={release}'"
    return (
        f"{package} >= {minimum} has no release yet (the newest {package} known to this doctor, as of "
        f"{KNOWN_AS_OF}, is {_known(package)[-1]})"
    )
