"""The cluster's CURVE keys: ZeroMQ encrypts and authenticates the traffic
between the head and the compute daemons with them. Each node has a key of
its own, and its name is bound to it: the head knows a node by the key it
connected with, never by the name it claims, so that no holder of one node's
key can register as another, take its connection over or receive its tasks.

Layout of a key store (cmkeys STORE NODE...); each directory is the keys_dir
of one daemon, and only that daemon's machine gets it:
  STORE/head/head.key, head.key_secret     the head's key pair
  STORE/head/nodes/<node>.key              each node's public key, named as the node
  STORE/<node>/head.key                    the head's public key, which the node trusts
  STORE/<node>/node.key, node.key_secret   the node's own key pair

Every directory is 0700 and every secret 0600, its maker's alone (root's, in
a cluster): a daemon refuses a secret that others may read. Nodes added to
the store later are accepted by a running head (it reads nodes/ again when
that directory changes).
"""
import logging
import os
import re
import shutil
import stat

import zmq
import zmq.auth
from zmq.utils import z85

from .config import ConfigError

log = logging.getLogger("cm.keys")

NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def make(store, nodes=()):
    """Create the head's keys and each node's unless they exist; returns what was made
    ("head" and node names)."""
    made = []
    old_umask = os.umask(0o077)
    try:
        head_dir = os.path.join(store, "head")
        os.makedirs(os.path.join(head_dir, "nodes"), mode=0o700, exist_ok=True)
        os.chmod(store, 0o700)
        if not os.path.exists(os.path.join(head_dir, "head.key_secret")):
            zmq.auth.create_certificates(head_dir, "head")
            made.append("head")
        for name in nodes:
            if not NODE_NAME.fullmatch(name) or name in ("head", "db"):
                raise ConfigError(f"{name!r} is not a node name (letters, digits, '.', '_', '-'; "
                                  "not 'head' or 'db', the store's own)")
            node_dir = os.path.join(store, name)
            if os.path.exists(os.path.join(node_dir, "node.key_secret")):
                continue
            os.makedirs(node_dir, mode=0o700, exist_ok=True)
            zmq.auth.create_certificates(node_dir, "node")
            shutil.copy(os.path.join(head_dir, "head.key"), os.path.join(node_dir, "head.key"))
            published = os.path.join(head_dir, "nodes", name + ".key")
            shutil.copy(os.path.join(node_dir, "node.key"), published + ".new")
            os.replace(published + ".new", published)
            made.append(name)
    finally:
        os.umask(old_umask)
    return made


def make_database_password(store):
    """STORE/db/password for the database server (readable inside its container only: the
    store is root's) and STORE/head/db.password for the head; kept if they exist."""
    import secrets
    head_copy = os.path.join(store, "head", "db.password")
    if os.path.exists(head_copy):
        return False
    password = secrets.token_urlsafe(32)
    old_umask = os.umask(0o077)
    try:
        os.makedirs(os.path.join(store, "db"), mode=0o755, exist_ok=True)
        os.makedirs(os.path.join(store, "head"), mode=0o700, exist_ok=True)
        server_copy = os.path.join(store, "db", "password")
        with open(server_copy, "w") as f:
            f.write(password)
        os.chmod(server_copy, 0o644)      # the server may run as a user of its own image
        with open(head_copy, "w") as f:
            f.write(password)
    finally:
        os.umask(old_umask)
    return True


def read_secret(path, what):
    """A secret file's contents, if its owner alone may read it (ConfigError if not)."""
    _check_private(what, path)
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError as e:
        raise ConfigError(f"{what} {path}: {e.strerror}") from None


def _load(directory, name, secret):
    path = os.path.join(directory, name + (".key_secret" if secret else ".key"))
    if secret:
        _check_private(f"keys_dir {directory}", path)
    try:
        public, private = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"keys_dir {directory}: cannot read {os.path.basename(path)} ({e}); "
                          "`cmkeys STORE NODE...` makes the cluster's keys") from None
    return public, private


def _check_private(label, path):
    """A secret must be its owner's alone, and this daemon's (as ssh insists of its keys)."""
    try:
        info = os.stat(path)
    except OSError:
        return                            # _load says what is missing
    if info.st_mode & 0o077 or info.st_uid != os.geteuid():
        raise ConfigError(f"{label}: {os.path.basename(path)} may be read by others "
                          f"(mode {stat.filemode(info.st_mode)}, owner uid {info.st_uid}); it must be mode 0600 "
                          f"and owned by uid {os.geteuid()}, who runs this daemon")


class NodeKeys:
    """The compute nodes' public keys the head accepts, and the name each is bound to.
    Read again whenever a file of nodes/ changes (a key added, replaced or removed), by
    the authenticator's thread at each handshake and by the head's loop now and then;
    each replaces the tables whole, so readers see one version or the next."""

    def __init__(self, directory):
        self.directory = directory
        self.version = None
        self.names = {}                   # z85 public key (bytes) -> node name
        self.keys = {}                    # node name -> its z85 public key

    def _version(self):
        """What identifies the directory's contents: each plain file's name, inode, time and
        size (links and the rest are no keys); None if it cannot be listed."""
        try:
            entries = sorted(os.scandir(self.directory), key=lambda e: e.name)
        except OSError:
            return None
        version = []
        for e in entries:
            try:
                if e.is_file(follow_symlinks=False):
                    info = e.stat(follow_symlinks=False)
                    version.append((e.name, info.st_ino, info.st_mtime_ns, info.st_size))
            except OSError:
                continue                  # gone meanwhile (a key being replaced)
        return tuple(version)

    def refresh(self):
        version = self._version()
        if version is None:               # unreadable for now: the keys known stay
            log.warning("cannot list %s; keeping the node keys known", self.directory)
            return
        if version == self.version:
            return
        names = {}
        for entry, *_ in version or ():
            name = entry[:-4]
            if not entry.endswith(".key") or not NODE_NAME.fullmatch(name):
                continue
            try:
                public, _ = zmq.auth.load_certificate(os.path.join(self.directory, entry))
            except (OSError, ValueError):
                continue
            names[public] = name
        self.names, self.keys, self.version = names, {n: k for k, n in names.items()}, version

    def callback(self, domain, z85_key):
        """ZAP: is this a node's key?"""
        self.refresh()
        return z85_key in self.names

    def user_id(self, raw_key):
        """What the head's messages carry: "<node>:<key>" (the key, so that a key replaced
        or removed since the connection was made is no longer obeyed)."""
        key = z85.encode(raw_key)
        name = self.names.get(key)
        return f"{name}:{key.decode()}" if name else ""

    def current(self, user_id):
        """The node a message's User-Id names, if its key is still that node's; else None."""
        name, _, key = (user_id or "").partition(":")
        return name if name and self.keys.get(name, b"").decode() == key else None


def check_keys_or_insecure(cfg, role, log):
    """Before a daemon starts: its keys are there and its own (ConfigError if not); and a
    daemon running as root has keys, unless the settings say the cluster is insecure."""
    if cfg.keys_dir:
        if role == "head":
            _load(cfg.keys_dir, "head", secret=True)
        elif role == "compute":
            _load(cfg.keys_dir, "node", secret=True)
            _load(cfg.keys_dir, "head", secret=False)
        return
    if os.geteuid() == 0 and not cfg.insecure:
        raise ConfigError("keys_dir is empty: a daemon running as root without keys would let anyone who reaches "
                          "the head's port pose as the head or a node and run commands as any user; make keys "
                          "with `cmkeys STORE NODE...` and set keys_dir, or set insecure = true on a trusted network")
    log.warning("keys_dir is empty: compute traffic is neither encrypted nor authenticated (insecure)")


def serve_securely(ctx, socket, directory, log):
    """Make socket a CURVE server that accepts only the nodes' keys; each message it
    receives then carries, as its User-Id, the node whose key sent it (NodeKeys.current
    says which). Returns the authenticator, to stop when the head stops, and the keys."""
    from zmq.auth.thread import ThreadAuthenticator

    public, secret = _load(directory, "head", secret=True)
    nodes_dir = os.path.join(directory, "nodes")
    if not os.path.isdir(nodes_dir):
        raise ConfigError(f"keys_dir {directory}: no nodes/ directory of the nodes' keys; "
                          "`cmkeys STORE NODE...` makes a key per node")
    node_keys = NodeKeys(nodes_dir)

    auth = ThreadAuthenticator(ctx, log=log)
    auth.start()
    # The authenticator that answers ZAP requests: the thread's own in some pyzmq
    # releases (24), the ThreadAuthenticator itself in others.
    getattr(auth.thread, "authenticator", auth).curve_user_id = node_keys.user_id
    auth.configure_curve_callback(domain="*", credentials_provider=node_keys)
    socket.curve_secretkey, socket.curve_publickey = secret, public
    socket.curve_server = True
    return auth, node_keys


def connect_securely(socket, directory):
    """Make socket a CURVE client holding this node's key, trusting the head's key."""
    public, secret = _load(directory, "node", secret=True)
    server, _ = _load(directory, "head", secret=False)
    socket.curve_secretkey, socket.curve_publickey, socket.curve_serverkey = secret, public, server
