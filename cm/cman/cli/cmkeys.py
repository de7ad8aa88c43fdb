"""cmkeys: make the cluster's CURVE keys in a key store: the head's, and one
pair per compute node, bound to its name (keys that exist are kept).

    cmkeys drive/keys compute1 compute2 compute3

Each daemon's keys_dir is one directory of the store: STORE/head for the
head, STORE/<node> for a node (keys.py has the layout). Give each machine
only its own directory; every file is its maker's alone.
"""
from ..keys import make
from ..vocab import Exit
from .common import Parser, run


def parser():
    p = Parser(prog="cmkeys", description="Make the head's CURVE keys and each node's, unless they exist.")
    p.add_argument("store", help="the key store: STORE/head is the head's keys_dir, STORE/<node> each node's")
    p.add_argument("nodes", nargs="*", metavar="NODE", help="compute nodes to make keys for")
    return p


def main(args):
    made = make(args.store, args.nodes)
    if made:
        print(f"made keys in {args.store} for {', '.join(made)}")
    return Exit.OK


def cli():
    run("cmkeys", main, parser)
