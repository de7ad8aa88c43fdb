"""cmkeys: make the cluster's CURVE keys in a key store: the head's, and one
pair per compute node, bound to its name (keys that exist are kept).

    cmkeys drive/keys compute1 compute2 compute3
    cmkeys --database drive/keys      also a password for the database (STORE/db/password
                                      for its server, STORE/head/db.password for the head)

Each daemon's keys_dir is one directory of the store: STORE/head for the
head, STORE/<node> for a node (keys.py has the layout). Give each machine
only its own directory; every file is its maker's alone.
"""
from ..keys import make, make_database_password
from ..vocab import Exit
from .common import Parser, run


def parser():
    p = Parser(prog="cmkeys", description="Make the head's CURVE keys and each node's, unless they exist.")
    p.add_argument("store", help="the key store: STORE/head is the head's keys_dir, STORE/<node> each node's")
    p.add_argument("nodes", nargs="*", metavar="NODE", help="compute nodes to make keys for")
    p.add_argument("--database", action="store_true", help="also make the database's password")
    return p


def main(args):
    made = make(args.store, args.nodes)
    if args.database and make_database_password(args.store):
        made.append("the database")
    if made:
        print(f"made keys in {args.store} for {', '.join(made)}")
    return Exit.OK


def cli():
    run("cmkeys", main, parser)
