"""A progress bar on stderr: tqdm when it is installed, else one rewritten status line."""

from __future__ import annotations

import importlib.util
import sys
import time
from types import TracebackType
from typing import Any, TextIO

_MIN_INTERVAL_S = 0.2


class Progress:
    """``with Progress(total, "training") as bar: bar.update(note="fold 1")``; silent when
    ``enabled`` is False."""

    def __init__(self, total: int, desc: str, enabled: bool = True,
                 stream: TextIO | None = None) -> None:
        self.total = max(int(total), 0)
        self.desc = desc
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.done = 0
        self._start = time.monotonic()
        self._shown = -1.0
        self._tqdm: Any = None
        if enabled and importlib.util.find_spec("tqdm") is not None:
            from tqdm import tqdm

            self._tqdm = tqdm(total=self.total, desc=desc, file=self.stream, leave=True)

    def update(self, n: int = 1, note: str = "") -> None:
        """Count ``n`` more steps done; ``note`` says what is running now."""
        self.done += n
        if not self.enabled:
            return
        if self._tqdm is not None:
            self._tqdm.set_postfix_str(note, refresh=False)
            self._tqdm.update(n)
            return
        elapsed = time.monotonic() - self._start
        if self.done < self.total and elapsed - self._shown < _MIN_INTERVAL_S:
            return  # at most a few redraws a second
        self._shown = elapsed
        print(f"\r{self.desc}: {self.done}/{self.total}  {elapsed:5.1f} s  {note:<40}",
              end="", file=self.stream, flush=True)

    def close(self) -> None:
        """End the line (or the tqdm bar)."""
        if not self.enabled:
            return
        if self._tqdm is not None:
            self._tqdm.close()
        else:
            print(file=self.stream, flush=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
