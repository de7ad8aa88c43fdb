"""What every command shares: argument parsing that fails in one line, and
one error funnel that turns any failure into "prog: error: message" on
stderr and an exit status (0 ok, 1 error, 2 usage, 3 head unreachable).
Tracebacks appear only with --debug, which is cm's own option only where
the parser says an option may stand: never inside a job's command.
"""
import argparse
import sys

from ..client import CliError, Unreachable
from ..config import ConfigError
from ..vocab import Exit


class UsageError(Exception):
    pass


class Parser(argparse.ArgumentParser):
    """argparse with cm's conventions: errors are a UsageError (one line, not
    a usage dump), every command takes --debug, options are never abbreviated
    (so that where cm's options end is exact), and a command that runs a
    program (command=True) takes it after its options or after `--`."""

    def __init__(self, *args, command=False, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.takes_command = command
        # SUPPRESS: a subcommand's parser does not reset what the main one read.
        self.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                          help="show the traceback of an internal error")

    def error(self, message):
        raise UsageError(message)

    def parse(self, argv):
        """The namespace of argv; with command=True, args.command holds the program and its arguments."""
        if not self.takes_command:
            return self.parse_args(argv)
        options, command = self.split_command(argv)
        args = self.parse_args(options)
        args.command = command
        return args

    def split_command(self, argv):
        """(cm's options, the command). The command starts at the first word
        that is neither an option nor an option's value, or right after `--`,
        which belongs to neither: everything from there on is the command's
        own, `--` and `--debug` included."""
        i = 0
        while i < len(argv):
            word = argv[i]
            if word == "--":
                return argv[:i], argv[i + 1:]
            if not word.startswith("-") or word == "-":
                return argv[:i], argv[i:]
            i += 2 if self._value_follows(word) else 1
        return argv, []

    def _value_follows(self, word):
        """Whether option word takes its value from the next word (--opt VALUE, -o VALUE)."""
        if word.startswith("--"):
            action = self._option_string_actions.get(word)
            return action is not None and action.nargs != 0
        for position in range(1, len(word)):             # -o, -oVALUE, or bundled flags -ab
            action = self._option_string_actions.get("-" + word[position])
            if action is None:
                return False                             # argparse names the unknown option
            if action.nargs != 0:
                return position == len(word) - 1         # else the rest of the word is the value
        return False

    def format_help(self):
        for action in self._actions:
            setting = getattr(action, "setting", None)
            if setting and not getattr(action, "described", False):
                action.help = f"{action.help} (default: {configured_default(setting)})"
                action.described = True
        return super().format_help()


def configured(action, setting):
    """Mark an option whose default is the setting; --help says the value in force and where it is set."""
    action.setting = setting
    return action


def configured_default(setting):
    """'1, from cm.conf': a setting's value as the command will use it, and its origin."""
    from .. import config, units
    try:
        settings = config.load()
    except ConfigError as e:
        return f"the setting {setting}, which cannot be read: {e}"
    value = getattr(settings, setting)
    if setting == "default_time":
        shown = units.format_time_limit(value) if value else "unlimited"
    elif setting == "default_mem":
        shown = units.format_mem(value) if value else "none"
    else:
        shown = str(value)
    return f"{shown}, from {settings.origin(setting)}"


def whole_number(minimum, maximum=None):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"want a whole number, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            want = f"from {minimum} to {maximum}" if maximum is not None else f">= {minimum}"
            raise argparse.ArgumentTypeError(f"want a whole number {want}, got {text!r}")
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


def job_ids(texts):
    """Jobs as typed (cmkill 7 8, cmctl hold 7, cmkill 12_7 for an array's element): ints, and
    "ARRAY_TASK" strings; UsageError naming one that is neither."""
    ids = []
    for text in texts:
        array, sep, task = text.partition("_")
        if not all(word.isdigit() and word.isascii() and len(word) <= 16 for word in ([array, task] if sep else [text])):
            raise UsageError(f"{text!r} is not a job id (7, or 12_7 for an array's element)")
        ids.append(f"{int(array)}_{int(task)}" if sep else int(text))
    return ids


def each_job_reported(prog, reply):
    """One line per job the head could not act on; the exit status (the others were done)."""
    from ..vocab import Exit
    status = Exit.OK
    for result in reply["results"]:
        if not result["ok"]:
            error(prog, f"job {result['job_id']}: {result['error']}")
            status = Exit.ERROR
    return status


def run(prog, main, parser, argv=None):
    """Parse argv with parser(), call main(args) and exit with its status;
    every failure becomes one line."""
    argv = sys.argv[1:] if argv is None else argv
    debug = False
    try:
        args = parser().parse(argv)
        debug = getattr(args, "debug", False)
        status = main(args)
    except UsageError as e:
        error(prog, f"{e} (see {prog} --help)")
        status = Exit.USAGE
    except Unreachable as e:
        error(prog, str(e))
        status = Exit.UNREACHABLE
    except (CliError, ConfigError) as e:
        error(prog, str(e))
        status = Exit.USAGE if getattr(e, "usage", False) else Exit.ERROR
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
