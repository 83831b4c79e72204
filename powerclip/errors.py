"""Which failures a command reports in one line, and that line.

A bad config, a missing shard, a damaged checkpoint, a full disk: the user can fix these, and a
traceback would only hide the one sentence that says how. Everything else is a bug and keeps its
traceback. The project's own such errors derive from ``UserError``; OSError is the other kind.
"""

from __future__ import annotations

import errno

# what to do about an OSError, by errno
_OS_FIXES: dict[int, str] = {
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "check the path",
    errno.EISDIR: "name a file, not a folder",
    errno.EEXIST: "a file is in the way: choose another path",
    errno.EACCES: "check the permissions of the path (or choose another one)",
    errno.EPERM: "check the permissions of the path (or choose another one)",
    errno.EROFS: "the file system is read-only: choose a writable path",
    errno.ENOSPC: "free space on that file system (or write elsewhere)",
    errno.EDQUOT: "the disk quota is exceeded: free space (or write elsewhere)",
}


class UserError(Exception):
    """A failure the user can fix, whose message names the problem (key, file, shard) and the fix.

    The project's error types derive from it next to their builtin base (``ValueError``,
    ``RuntimeError``), so commands print them in one line instead of a traceback."""


def is_expected(e: BaseException) -> bool:
    """True when ``e`` is a failure the user can fix from its message (no traceback needed)."""
    return isinstance(e, (UserError, OSError))


def one_line(e: BaseException) -> str:
    """The message of ``e`` on one line; for an error re-raised from a DataLoader worker (whose
    message embeds the worker's traceback) the original error's own line."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    if len(lines) > 1 and lines[0].startswith("Caught ") and "Original Traceback" in lines[1]:
        last = lines[-1]
        return last.split(": ", 1)[1] if ": " in last and last.split(": ", 1)[0].endswith("Error") else last
    return " ".join(lines)


def describe(e: BaseException) -> str:
    """One line for an expected failure: the message, and for an OSError the path and the fix."""
    if isinstance(e, OSError) and e.strerror and e.filename is not None:
        fix = _OS_FIXES.get(e.errno or 0)
        where = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else f"{e.filename}"
        return f"{where}: {e.strerror}" + (f" ({fix})" if fix else "")
    text = one_line(e) or type(e).__name__
    if isinstance(e, OSError) and e.errno in _OS_FIXES and _OS_FIXES[e.errno] not in text:
        text += f" ({_OS_FIXES[e.errno]})"
    return text
