"""The cluster's users file: parsing, and adding without clashes."""
import pytest

from cman.users import UsersError, add, parse


def test_a_users_file_is_parsed_with_comments(tmp_path):
    path = tmp_path / "users"
    path.write_text("# who\nalice:1001:1001\n\nbob:1002:100\n")
    assert parse(str(path)) == [("alice", 1001, 1001), ("bob", 1002, 100)]
    assert parse(str(tmp_path / "missing")) == []


@pytest.mark.parametrize("line, message", [
    ("alice:1001", "want name:uid:gid"),
    ("Alice:1001:1001", "is not a user name"),
    ("alice:x:1001", "whole numbers"),
    ("root:0:0", "whole numbers from 1"),
])
def test_bad_lines_are_named(tmp_path, line, message):
    path = tmp_path / "users"
    path.write_text(f"# header\n{line}\n")
    with pytest.raises(UsersError, match=f"users:2: .*{message}"):
        parse(str(path))


def test_add_is_idempotent_and_refuses_clashes(tmp_path):
    path = str(tmp_path / "users")
    assert add(path, "alice", 1001, 1001)
    assert not add(path, "alice", 1001, 1001)
    with pytest.raises(UsersError, match="clashes"):
        add(path, "alice", 1002, 1001)
    with pytest.raises(UsersError, match="clashes"):
        add(path, "eve", 1001, 1001)
    assert parse(path) == [("alice", 1001, 1001)]
