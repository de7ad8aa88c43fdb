"""The cluster's users: one file (drive/etc/users, /etc/cm/users inside the
containers) of "name:uid:gid" lines, made real on every node, so that files
on the shared /home have the right owners and jobs run as their submitters.
"""
import grp
import os
import pwd
import re
import subprocess

NAME = re.compile(r"[a-z_][a-z0-9_-]{0,31}")


class UsersError(ValueError):
    """A bad users file or a conflict with an existing account; the message says which."""


def parse(path):
    """[(name, uid, gid)] from a users file; a missing file means no users."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    except OSError as e:
        raise UsersError(f"cannot read {path}: {e.strerror}") from None
    users, names, uids = [], set(), set()
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user = parse_line(line, f"{path}:{number}")
        if user[0] in names or user[1] in uids:
            raise UsersError(f"{path}:{number}: {user[0]} or uid {user[1]} appears twice")
        names.add(user[0])
        uids.add(user[1])
        users.append(user)
    return users


def parse_line(line, where):
    parts = line.split(":")
    if len(parts) != 3:
        raise UsersError(f"{where}: want name:uid:gid, got {line!r}")
    name, uid, gid = parts
    if not NAME.fullmatch(name):
        raise UsersError(f"{where}: {name!r} is not a user name (lower-case letters, digits, _ and -)")
    if not (uid.isdigit() and gid.isdigit()) or not (1 <= int(uid) < 2**31 and 1 <= int(gid) < 2**31):
        raise UsersError(f"{where}: uid and gid must be whole numbers from 1 up (root needs no entry)")
    return name, int(uid), int(gid)


def add(path, name, uid, gid):
    """Append a user to the file unless it is there already; refuse a clash."""
    parse_line(f"{name}:{uid}:{gid}", "the new user")
    for other, other_uid, other_gid in parse(path):
        if (other, other_uid, other_gid) == (name, uid, gid):
            return False
        if other == name or other_uid == uid:
            raise UsersError(f"{path} already has {other}:{other_uid}:{other_gid}, which clashes with {name}:{uid}:{gid}")
    with open(path, "a") as f:
        f.write(f"{name}:{uid}:{gid}\n")
    return True


def sync(path, home_root="/home"):
    """Create every user of the file that this machine lacks, with its group and
    a home directory on the shared /home. Returns the names created."""
    created = []
    for name, uid, gid in parse(path):
        _ensure_group(name, gid)
        try:
            existing = pwd.getpwnam(name)
        except KeyError:
            existing = None
        if existing is None:
            _check_uid_free(name, uid)
            _run(["useradd", "--uid", str(uid), "--gid", str(gid), "--no-create-home",
                  "--home-dir", os.path.join(home_root, name), "--shell", "/bin/bash", name])
            created.append(name)
        elif existing.pw_uid != uid:
            raise UsersError(f"user {name} has uid {existing.pw_uid} here and {uid} in {path}")
        home = os.path.join(home_root, name)
        if not os.path.isdir(home):
            os.makedirs(home, exist_ok=True)
            os.chown(home, uid, gid)
    return created


def _ensure_group(name, gid):
    try:
        grp.getgrgid(gid)
        return
    except KeyError:
        pass
    group = name
    try:
        grp.getgrnam(group)
        group = f"{name}{gid}"              # the name is taken by another gid
    except KeyError:
        pass
    _run(["groupadd", "--gid", str(gid), group])


def _check_uid_free(name, uid):
    try:
        holder = pwd.getpwuid(uid)
    except KeyError:
        return
    raise UsersError(f"uid {uid} of {name} already belongs to {holder.pw_name} on this machine")


def _run(argv):
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise UsersError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")
