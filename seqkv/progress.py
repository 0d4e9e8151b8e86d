"""Progress bars for long work (tqdm on stderr), off unless asked for."""
from __future__ import annotations


def progress_bar(items, desc: str, enabled: bool = False):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="layer", leave=False)
