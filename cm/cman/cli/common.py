"""What every command shares: argument parsing that fails in one line, and
one error funnel that turns any failure into "prog: error: message" on
stderr and an exit status (0 ok, 1 error, 2 usage, 3 head unreachable).
Tracebacks appear only with --debug.
"""
import argparse
import sys

from ..client import CliError, Unreachable
from ..config import ConfigError
from ..vocab import Exit


class UsageError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    """argparse whose errors are a UsageError, not a usage dump and exit."""

    def error(self, message):
        raise UsageError(message)


def whole_number(minimum):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"want a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"want a whole number >= {minimum}, got {text!r}")
        return value
    return parse


def converted(convert):
    """An argparse type from a function that raises ValueError with a message."""
    def parse(text):
        try:
            return convert(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse


def error(prog, message):
    print(f"{prog}: error: {message}", file=sys.stderr)


def run(prog, main, argv=None):
    """Call main(argv) and exit with its status; every failure becomes one line."""
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        status = main([a for a in argv if a != "--debug"])
    except UsageError as e:
        error(prog, f"{e} (see {prog} --help)")
        status = Exit.USAGE
    except Unreachable as e:
        error(prog, str(e))
        status = Exit.UNREACHABLE
    except (CliError, ConfigError) as e:
        error(prog, str(e))
        status = Exit.ERROR
    except KeyboardInterrupt:
        status = 130
    except BrokenPipeError:
        status = Exit.ERROR
    except Exception as e:
        if debug:
            raise
        error(prog, f"internal error: {e!r} (run with --debug for the traceback)")
        status = Exit.ERROR
    sys.exit(status)
