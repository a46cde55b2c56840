"""Progress bars: one wrapper for every loop that shows one, and a switch for Hugging Face's own."""

from __future__ import annotations

import contextlib


class Progress:
    """A tqdm bar when enabled (and there is something to count), else nothing at all."""

    def __init__(self, total: int, enabled: bool, desc: str, unit: str = "ex", initial: int = 0):
        self.bar = None
        if enabled and total:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, unit=unit, desc=desc, dynamic_ncols=True, smoothing=0.1)

    def update(self, n: int = 1, postfix: dict | None = None) -> None:
        if self.bar is None:
            return
        if postfix:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@contextlib.contextmanager
def quiet_hf_progress_bars(datasets_too: bool):
    """Hide the Hugging Face progress bars (weights loading/writing; with `datasets_too` also the
    datasets map bars) for the block, restoring them afterwards."""
    import datasets
    import transformers.utils.logging as hf_logging

    hf_was = hf_logging.is_progress_bar_enabled()
    ds_was = datasets.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    if datasets_too:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if hf_was:
            hf_logging.enable_progress_bar()
        if datasets_too and ds_was:
            datasets.enable_progress_bars()
