"""Self-pipes that wake an event loop from outside it: a signal (through
signal.set_wakeup_fd) or another thread writes a byte; the loop polls the
read end and drains it. Signal handlers themselves only set flags.
"""
import os
import signal


class Wakeup:
    def __init__(self):
        self.fd, self._write_fd = os.pipe()       # fd: what the loop polls
        os.set_blocking(self.fd, False)
        os.set_blocking(self._write_fd, False)

    def wake(self):
        try:
            os.write(self._write_fd, b"!")
        except BlockingIOError:                   # full: the loop is awake anyway
            pass

    def drain(self):
        try:
            while os.read(self.fd, 4096):
                pass
        except BlockingIOError:
            pass


def on_signals(handlers):
    """Install {signal: handler} and a Wakeup that every signal writes to."""
    wakeup = Wakeup()
    signal.set_wakeup_fd(wakeup._write_fd)
    for sig, handler in handlers.items():
        signal.signal(sig, handler)
    return wakeup
