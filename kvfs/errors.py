"""Error types of kvfs.

Every failure the engine can report to a client is a `KvfsError` carrying an errno; the FUSE
layer (kvfs/fs.py) is the one place that turns them into `FUSEError`. Command-line tools
raise `QuietError` for user mistakes: one line on stderr and a documented exit code.
"""

import errno


class KvfsError(Exception):
    """A failure with an errno that a filesystem client can be given."""

    errno = errno.EIO

    def __init__(self, msg: str = "", err: int | None = None):
        super().__init__(msg)
        if err is not None:
            self.errno = err


class NotFound(KvfsError):
    errno = errno.ENOENT


class Exists(KvfsError):
    errno = errno.EEXIST


class NotEmpty(KvfsError):
    errno = errno.ENOTEMPTY


class NameTooLong(KvfsError):
    errno = errno.ENAMETOOLONG


class IsADirectory(KvfsError):
    errno = errno.EISDIR


class NotADirectory(KvfsError):
    errno = errno.ENOTDIR


class ReadOnly(KvfsError):
    errno = errno.EROFS


class Invalid(KvfsError):
    errno = errno.EINVAL


class NoSpace(KvfsError):
    errno = errno.ENOSPC


class FileTooBig(KvfsError):
    errno = errno.EFBIG


class QuotaExceeded(KvfsError):
    errno = errno.EDQUOT


class NoAttr(KvfsError):
    errno = errno.ENODATA


class Corrupt(KvfsError):
    """Stored bytes do not match their content hash, or metadata is inconsistent."""

    errno = errno.EIO


class Damaged(Corrupt):
    """A block's stored copy failed verification (or is quarantined): EIO, with where it is
    (loc: hash, device, offset, stored length, raw length, codec)."""

    def __init__(self, msg: str, loc: tuple):
        super().__init__(msg)
        self.loc = loc


# Exit codes shared by every kvfs command (each man page lists the ones it uses).
EXIT_OK = 0
EXIT_INTERNAL = 1  # a bug: the traceback went to the log / stderr
EXIT_USAGE = 2  # bad arguments (argparse uses 2 as well)
EXIT_NO_WAREHOUSE = 3  # not found, not a kvfs warehouse, or an unknown format revision
EXIT_EXISTS = 4  # mkfs over an existing warehouse without --force
EXIT_IN_USE = 5  # the warehouse is mounted or locked by another process
EXIT_MOUNT_FAILED = 6  # mounting or unmounting failed (mount point busy, FUSE error)
EXIT_NOT_MOUNTED = 7  # the path is not a kvfs mount point
EXIT_FSCK_ERRORS = 8  # fsck found inconsistencies (and did not repair them all)
EXIT_DEVICE = 9  # a device is missing, too small, or belongs to another warehouse
EXIT_NEEDS_FSCK = 10  # metadata is damaged: run kvfs fsck
EXIT_PERMISSION = 11  # not permitted: the control interface is for root and the warehouse owner
EXIT_INTERRUPTED = 130  # SIGINT (128 + 2, as a shell reports it)
EXIT_PIPE = 141  # standard output's reader went away (128 + SIGPIPE, as a shell reports it)


class QuietError(Exception):
    """A user-facing failure: printed as one line, no traceback, with an exit code."""

    def __init__(self, msg: str, exitcode: int = EXIT_INTERNAL):
        super().__init__(msg)
        self.exitcode = exitcode
