"""cmkeys: make the cluster's CURVE keys in a directory (if it has none).

    cmkeys drive/etc/keys
"""
from ..keys import make
from ..vocab import Exit
from .common import Parser, run


def parser():
    p = Parser(prog="cmkeys", description="Make the cluster's CURVE keys (head and compute) unless they exist.")
    p.add_argument("directory", help="where the keys go (keys_dir)")
    return p


def main(args):
    if make(args.directory):
        print(f"made the cluster's keys in {args.directory}")
    return Exit.OK


def cli():
    run("cmkeys", main, parser)
