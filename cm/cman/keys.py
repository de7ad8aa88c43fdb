"""The cluster's CURVE keys: ZeroMQ encrypts and authenticates the traffic
between the head and the compute daemons with them, and the head refuses a
compute daemon that does not hold them.

Layout of keys_dir:
  head.key, head.key_secret     the head's key pair (compute daemons need head.key)
  node.key, node.key_secret     the key pair every compute node holds
  authorized/node.key           the client keys the head accepts
"""
import os
import shutil

import zmq
import zmq.auth

from .config import ConfigError


def make(directory):
    """Create the keys unless they exist; returns True if it made them."""
    if os.path.exists(os.path.join(directory, "head.key_secret")):
        return False
    os.makedirs(os.path.join(directory, "authorized"), exist_ok=True)
    os.chmod(directory, 0o700)
    for name in ("head", "node"):
        _, secret = zmq.auth.create_certificates(directory, name)
        os.chmod(secret, 0o600)
    shutil.copy(os.path.join(directory, "node.key"), os.path.join(directory, "authorized", "node.key"))
    return True


def _load(directory, name, secret):
    path = os.path.join(directory, name + (".key_secret" if secret else ".key"))
    try:
        public, private = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"keys_dir {directory}: cannot read {os.path.basename(path)} ({e}); "
                          "`cmkeys DIR` makes the cluster's keys") from None
    return public, private


def serve_securely(ctx, socket, directory, log):
    """Make socket a CURVE server that accepts only the authorized compute keys.
    Returns the authenticator, to stop when the head stops."""
    from zmq.auth.thread import ThreadAuthenticator
    public, secret = _load(directory, "head", secret=True)
    authorized = os.path.join(directory, "authorized")
    if not os.path.isdir(authorized) or not os.listdir(authorized):
        raise ConfigError(f"keys_dir {directory}: no authorized/ client keys; `cmkeys DIR` makes them")
    auth = ThreadAuthenticator(ctx, log=log)
    auth.start()
    auth.configure_curve(domain="*", location=authorized)
    socket.curve_secretkey, socket.curve_publickey = secret, public
    socket.curve_server = True
    return auth


def connect_securely(socket, directory):
    """Make socket a CURVE client holding the node key, trusting the head's key."""
    public, secret = _load(directory, "node", secret=True)
    server, _ = _load(directory, "head", secret=False)
    socket.curve_secretkey, socket.curve_publickey, socket.curve_serverkey = secret, public, server
