"""What a name inside a mount may be: the one rule for path components, shared by every parser.

Owns: `NAME_MAX` (what statfs reports as `f_namemax`) and `name_problem`/`path_problem`, which say why a
manifest entry name or an asset path cannot be shown (empty, `.`/`..`, a `/` or NUL, not encodable as
UTF-8 such as a lone surrogate, longer than `NAME_MAX` bytes). Callers refuse such input while parsing;
nothing is ever normalized (`a/../b` is refused, not turned into `b`), so nothing can resolve outside
its directory. Pure functions, no I/O.
"""

from __future__ import annotations

#: Longest name in bytes (UTF-8), as the kernel and statfs's f_namemax see it.
NAME_MAX = 255


def name_problem(name: str) -> str | None:
    """Why `name` cannot be one path component, or None when it can."""
    if not name:
        return "empty name"
    if name in (".", ".."):
        return f"reserved name {name!r}"
    if "/" in name or "\0" in name:
        return f"name {name!r:.80} contains '/' or NUL"
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return f"name {name!r:.80} is not valid Unicode (lone surrogate)"
    if size > NAME_MAX:
        return f"name {name[:40]!r}... is {size} bytes long (at most {NAME_MAX})"
    return None


def path_problem(path: str) -> str | None:
    """Why `path` cannot be a relative `/`-separated path of valid names, or None when it can."""
    if not path:
        return "empty path"
    if path.startswith("/"):
        return f"absolute path {path!r:.80}"
    for part in path.split("/"):
        if (why := name_problem(part)) is not None:
            return why
    return None
