"""A progress bar for long work: steps done, loss, tokens/s and time left."""

from __future__ import annotations

import sys

from tqdm import tqdm


class Progress:
    def __init__(self, total: int, initial: int = 0, unit: str = "step", enabled: bool = True):
        self.bar = tqdm(total=total, initial=initial, unit=unit, dynamic_ncols=True, mininterval=1.0,
                        file=sys.stderr, disable=None if enabled else True)  # None: no bar when stderr is not a terminal
        self.enabled = enabled
        self.rate = None

    def update(self, loss: float | None = None) -> None:
        postfix = {"loss": f"{loss:.4f}"} if loss is not None else {}
        if self.rate is not None:
            postfix["tok/s"] = f"{self.rate:,.0f}"
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)

    def set_rate(self, tokens_per_second: float) -> None:
        self.rate = tokens_per_second

    def report(self, text: str) -> None:
        """A line for logs: printed when there is no live bar to show the same numbers."""
        if self.bar.disable and self.enabled:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()
