"""cmusers: the cluster's users file, and making its users real on a node.

    cmusers sync [--file /etc/cm/users]            # at container start: create missing users
    cmusers add NAME UID GID [--file drive/etc/users]
"""
from ..client import CliError
from ..users import UsersError, add, sync
from ..vocab import Exit
from .common import Parser, run, whole_number

DEFAULT_FILE = "/etc/cm/users"


def parser():
    p = Parser(prog="cmusers", description="Manage the cluster's users (name:uid:gid lines).")
    sub = p.add_subparsers(dest="action", required=True, metavar="{sync,add}")
    s = sub.add_parser("sync", help="create the users of the file that this machine lacks")
    a = sub.add_parser("add", help="add a user to the file unless it is there")
    a.add_argument("name")
    a.add_argument("uid", type=whole_number(1))
    a.add_argument("gid", type=whole_number(1))
    for action in (s, a):
        action.add_argument("--file", default=DEFAULT_FILE, help="the users file (default: %(default)s)")
    return p


def main(args):
    try:
        if args.action == "sync":
            for name in sync(args.file):
                print(f"created user {name}")
        elif add(args.file, args.name, args.uid, args.gid):
            print(f"added {args.name}:{args.uid}:{args.gid} to {args.file}")
    except (UsersError, OSError) as e:
        raise CliError(str(e)) from None
    return Exit.OK


def cli():
    run("cmusers", main, parser)
