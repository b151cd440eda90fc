"""Progress reporting for calibration passes: a tqdm bar that only appears after one second."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], *, total: int | None, description: str, quiet: bool = False) -> Iterator[T]:
    """Iterate ``items``, showing a progress bar on stderr when the loop takes longer than a second."""
    if quiet:
        yield from items
        return
    from tqdm.auto import tqdm

    yield from tqdm(items, total=total, desc=description, delay=1.0, leave=False, unit="batch")
