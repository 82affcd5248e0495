"""The progress of a long run on stderr: tqdm's bar when tqdm is installed, else a plain text bar
(one line per step when stderr is not a terminal, so logs stay readable)."""

import sys
import time


class Progress:
    """Call with the label of each step as it starts; close() when done."""

    def __init__(self, total: int, stream=sys.stderr):
        self.total, self.stream, self.done, self.start = total, stream, 0, time.time()
        self.started = False
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total, file=stream, unit="step", dynamic_ncols=True)
        except ImportError:
            self.bar = None
        self.tty = getattr(stream, "isatty", lambda: False)()

    def __call__(self, label: str) -> None:
        if self.started:  # the previous step has finished
            self._advance()
        self.started = True
        if self.bar is not None:
            self.bar.set_description(label)
        else:
            self._print(label)

    def _advance(self) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)

    def _print(self, label: str) -> None:
        width = 30
        filled = width * self.done // max(1, self.total)
        line = (f"[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                f"{time.time() - self.start:4.0f} s  {label}")
        if self.tty:
            self.stream.write("\r" + line.ljust(100)[:100])
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.started:
            self._advance()
        if self.bar is not None:
            self.bar.close()
        else:
            self._print("done")
            if self.tty:
                self.stream.write("\n")
