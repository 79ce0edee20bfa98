"""The everyday subcommands: ``upload``, ``get``, ``ls``, ``info``, ``rm``, ``mv``, ``cp``, ``paths`` and ``check``.

Each talks to the trackers of ``--trackers`` (or ``$MOGILEFS_TRACKERS``) about the keys of
``--domain`` (or ``$MOGILEFS_DOMAIN``); those that write also drop the keys they change from the
shared path cache of ``--memcached`` (or ``$MOGILEFS_MEMCACHED``). Errors of this package go up
to :func:`cli.main`, which prints them as one line; local file errors are printed here the same way.
Keys, paths and messages pass through :func:`~.progress.printable` on their way to the terminal:
they come from trackers and file names, and may hold control characters.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import io
import itertools
import json
import os
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, TYPE_CHECKING, BinaryIO, NoReturn

from .. import health
from ..client import Client, FileInfo
from ..deadline import checked_seconds
from ..exceptions import BadKeyError, MogileFSError, StorageError, UnknownKeyError, UploadError
from ..protocol import check_key, names_a_fid, to_bytes, to_text
from ..storage import LengthMismatchError, ResumedReplica, Resumption, SeekableBody, open_replica
from ..tracker import Address, parse_trackers
from ..upload import Uploader, remaining_size
from .progress import ProgressBar, printable, quoted, shown
from .signals import InterruptibleReader

if TYPE_CHECKING:
    from ..memcache import MemcachedBackend

Subcommand = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]

#: The epilog of ``mogile-middleware --help``.
EPILOG = """\
examples:
  export MOGILEFS_TRACKERS=10.0.0.1:7001,10.0.0.2:7001 MOGILEFS_DOMAIN=media
  mogile-middleware upload avatars/42.png 42.png --class avatar
  mogile-middleware upload photos/2024/ ~/Pictures/2024 --recursive
  tar -c logs | mogile-middleware upload backups/logs.tar -
  mogile-middleware get avatars/42.png -o 42.png
  mogile-middleware get photos/2024/ -o ~/Pictures/2024 --recursive
  mogile-middleware ls photos/ --long
  mogile-middleware info avatars/42.png
  mogile-middleware mv avatars/42.png avatars/43.png
  mogile-middleware cp avatars/43.png backup/43.png --class thumb
  mogile-middleware rm avatars/43.png --memcached 10.0.0.9:11211
  mogile-middleware rm --prefix tmp/ --yes
  mogile-middleware check --json
  mogile-middleware devserver --domain media --class avatar=2

exit codes:
  0  success (also when the reader of stdout stops early, as head does)
  1  failure: no tracker answered, a storage node failed, an upload failed,
     an unknown class or domain, a local file could not be read or written
  2  usage error: a bad or missing option (--trackers, --domain)
  3  no such key
  130, 143, 129  stopped by Ctrl-C (SIGINT), SIGTERM or SIGHUP (the terminal
     or the ssh session gone), leaving no partial file
"""


def _required(option: str, variable: str, convert: Callable[[str], object]) -> Callable[[str], object]:
    """An argparse ``type`` for ``option`` (and its default, ``$variable``): an empty value is a
    usage error naming both."""

    def parse(text: str) -> object:
        if not text.strip():
            raise argparse.ArgumentTypeError(f"required: pass {option} or set {variable}")
        return convert(text)

    return parse


class Trackers(list[Address]):
    """The trackers of ``--trackers``; ``port_assumed`` if one was given without its port."""

    port_assumed = False


def _trackers(text: str) -> Trackers:
    try:
        trackers = Trackers(parse_trackers(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    trackers.port_assumed = not all(map(_names_a_port, text.replace(",", " ").split()))
    return trackers


def _names_a_port(tracker: str) -> bool:
    """True if a tracker address gives its port: ``host:port``, ``[::1]:7001``; not ``::1``,
    whose colons are the address's own (as :func:`~mogile_middleware.tracker.parse_address` reads it)."""
    if tracker.startswith("["):
        return tracker.rpartition("]")[2].startswith(":")
    return tracker.count(":") == 1


#: The options of every command that talks to trackers, given before or after its name:
#: option → (its environment variable, what makes its value).
_CONNECTION = {"--trackers": ("MOGILEFS_TRACKERS", _trackers), "--domain": ("MOGILEFS_DOMAIN", str)}
_CONNECTION_HELP = {"--trackers": "trackers, comma or space separated (default: $MOGILEFS_TRACKERS)",
                    "--domain": "MogileFS domain of the keys (default: $MOGILEFS_DOMAIN)"}


def connection_options(parser: argparse.ArgumentParser, *, before_command: bool = False) -> None:
    """Add ``--trackers`` and ``--domain`` to ``parser``: the main parser (``before_command``) or
    a command's. They are set only when given; :func:`resolve_connection_options` does the rest."""
    for option, (variable, convert) in _CONNECTION.items():
        # SUPPRESS: a command's parser sets nothing when the option comes before the command.
        parser.add_argument(option, default=argparse.SUPPRESS, metavar="HOST:PORT,..." if option == "--trackers" else None,
                            type=_required(option, variable, convert),
                            help=_CONNECTION_HELP[option] + ("; also after the command" if before_command else ""))
    if not before_command:
        parser.set_defaults(talks_to_trackers=True)


def resolve_connection_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """For a command that talks to trackers: the options not given take their environment
    variable's value; a usage error (exit 2) if that is unset or bad."""
    if not getattr(args, "talks_to_trackers", False):
        return
    for option, (variable, convert) in _CONNECTION.items():
        if not hasattr(args, option[2:]):
            try:
                setattr(args, option[2:], _required(option, variable, convert)(os.environ.get(variable, "")))
            except argparse.ArgumentTypeError as error:
                parser.error(f"argument {option}: {error}")


def _memcached(text: str) -> MemcachedBackend | None:
    """The shared path cache on the ``host:port`` servers of ``text``, its entries signed with
    ``$MOGILEFS_MEMCACHED_SECRET`` when set (never an option: ``ps`` shows a command's arguments),
    its keys starting with ``$MOGILEFS_MEMCACHED_PREFIX`` when set; none for an empty ``text``."""
    if not text.strip():
        return None
    try:
        from ..memcache import MemcachedBackend, checked_prefix  # pymemcache is an optional extra
    except ImportError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    secret, prefix = os.environ.get("MOGILEFS_MEMCACHED_SECRET"), os.environ.get("MOGILEFS_MEMCACHED_PREFIX")
    # Set to nothing, as a template whose value is missing leaves it: no signing, or the default, meant.
    for name, value, unset in [("MOGILEFS_MEMCACHED_SECRET", secret, "unsigned entries"),
                               ("MOGILEFS_MEMCACHED_PREFIX", prefix, "the default prefix")]:
        if value is not None and not value.strip():
            raise argparse.ArgumentTypeError(f"{name} is set but empty: give the site's value, or unset it for "
                                             f"{unset}")
    try:
        checked = {} if prefix is None else {"prefix": checked_prefix(prefix)}
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"MOGILEFS_MEMCACHED_PREFIX: {error}") from None
    try:
        return MemcachedBackend(text, secret=secret, **checked)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r}: {error}") from None


def _write_options(parser: argparse.ArgumentParser) -> None:
    """Add the connection options and ``--memcached``, for the subcommands that change keys."""
    connection_options(parser)
    parser.add_argument(
        "--memcached", default=os.environ.get("MOGILEFS_MEMCACHED", ""), metavar="HOST:PORT,...", type=_memcached,
        help="drop the changed keys from the middleware's path cache in these memcached servers, so every "
             "process sharing it sees the change at once (default: $MOGILEFS_MEMCACHED; empty: none), "
             "signed with $MOGILEFS_MEMCACHED_SECRET when set (the middleware's memcached_secret), its keys "
             "starting with $MOGILEFS_MEMCACHED_PREFIX when set (its memcached_prefix)",
    )


def _command(body: Callable[[argparse.Namespace, Client], int]) -> Callable[[argparse.Namespace], int]:
    """A subcommand's ``run`` from ``body``: give it a client for the options, then close it; name
    the key in a storage node's error (and see :func:`_local_errors`)."""

    @_local_errors
    def run(args: argparse.Namespace) -> int:
        # Only the subcommands that change keys have --memcached.
        client = Client(args.domain, args.trackers, cache_backend=getattr(args, "memcached", None))
        try:
            return body(args, client)
        except (StorageError, _ChecksumMismatch) as error:  # the replicas it names: the key too
            key = getattr(args, "key", None)
            if key is None or not isinstance(key, str):
                raise
            raise StorageError(f"'{key}': {error}", error.url, error.status) from error  # printable when printed
        finally:
            client.close()

    return run


def _local_errors(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``run`` that prints a local file error as one line (exit 1), and ends quietly (exit 0) when
    the reader of stdout has gone."""

    def guarded(args: argparse.Namespace) -> int:
        for name in ("stdin", "stdout"):
            if getattr(sys, name) is None:  # closed when the command started
                setattr(sys, name, _ClosedStream(name))
        given = sys.stdout
        if not isinstance(given, _ClosedStream):
            sys.stdout = _NamedStdout(given)  # type: ignore[assignment]
        try:
            code = run(args)
            sys.stdout.flush()  # here, where a closed pipe is caught, rather than at exit
            return code
        except OSError as error:
            if isinstance(error, BrokenPipeError) and error.filename in (None, "stdout"):
                detach_stdout()  # stdout's reader has gone (not that of -o FIFO): nothing to say
                return 0
            with contextlib.suppress(OSError):  # stderr gone with the terminal: the exit code says it
                print(f"mogile-middleware: {printable(_describe(error))}", file=sys.stderr)
            if error.filename == "stdout" and not isinstance(given, _ClosedStream):
                detach_stdout()  # what its buffer holds would fail again at exit (exit 120)
            return 1
        finally:
            sys.stdout = given

    return guarded


class _NamedStdout:
    """stdout, whose failures to take lines name it (``stdout: No space left on device``), as
    those of ``-o`` name the file: unnamed, after an upload, it read as a full storage node."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as error:
            raise _of_stdout(error) from None

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as error:
            raise _of_stdout(error) from None

    def __getattr__(self, name: str) -> object:
        return getattr(self._stream, name)


def _of_stdout(error: OSError) -> OSError:
    """``error`` (of its class: a closed pipe stays one) naming stdout, unless it names a file
    already or has no number to name (``io.UnsupportedOperation``)."""
    if error.filename is not None or error.errno is None:
        return error
    return type(error)(error.errno, error.strerror, "stdout")


class _ClosedStream(io.TextIOBase):
    """A standard stream that was closed when the command started (Python leaves it None): reading
    or writing it is the one-line error of a closed descriptor (exit 1), as with cat; flushing
    nothing and asking for a terminal are not errors."""

    def __init__(self, name: str) -> None:
        self._name = name

    def isatty(self) -> bool:
        return False

    def flush(self) -> None:
        pass

    def _closed(self, *args: object) -> NoReturn:
        raise OSError(errno.EBADF, os.strerror(errno.EBADF), self._name)

    write = read = readline = fileno = _closed  # type: ignore[assignment]

    @property
    def buffer(self) -> NoReturn:
        self._closed()


def _describe(error: OSError | MogileFSError) -> str:
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    return str(error)


def _skipped(key: str, reason: str) -> None:
    """Name on stderr a key the command passes over, and why; the others go on."""
    print(f"mogile-middleware: {quoted(key)}: {printable(reason)}: skipped", file=sys.stderr)


def detach_stdout() -> None:
    """Point stdout at the null device, so the flush at exit does not fail on the closed pipe again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


# -- upload -----------------------------------------------------------------------------------


def _add_upload_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``upload``."""
    _write_options(parser)
    parser.add_argument("key", metavar="KEY", help="key to store under (ending in /: a folder, to which the file's "
                                                   "name is added, as cp does); with --recursive, the prefix of the keys")
    parser.add_argument("source", metavar="FILE", type=path_argument,
                        help="file to store, - for stdin; with --recursive, a directory")
    parser.add_argument("--class", dest="cls", metavar="CLASS", help="MogileFS class (default: the domain's default)")
    parser.add_argument(
        "-r", "--recursive", action="store_true",
        help="store every file under the directory as KEY + its relative path (end KEY with / for a folder)",
    )
    parser.add_argument("--top-level", action="store_true",
                        help="with --recursive and an empty KEY (''), store the tree at the top of the domain "
                             "(an empty KEY is refused otherwise: an unset variable)")


def path_argument(value: str) -> str:
    """A path given on the command line. An empty one (an unset variable) is refused: taken for
    the current directory, ``upload -r`` stored all of it and ``get -r`` wrote into it."""
    if not value:
        raise argparse.ArgumentTypeError("an empty path (give . for the current directory)")
    return value


def _upload(args: argparse.Namespace, client: Client) -> int:
    if args.top_level != (args.recursive and not args.key):
        # An unset variable stored the tree at the top of the domain, over the keys there.
        wrong = ("--top-level goes with --recursive and an empty KEY ('')" if args.top_level else
                 "an empty KEY (give --top-level to store the tree at the top of the domain)")
        print(f"mogile-middleware: upload: {wrong}", file=sys.stderr)
        return 2
    uploader = Uploader(client)
    if args.recursive:
        files = [(path, args.key + relative) for path, relative in _files_under(Path(args.source))]
        if _unstorable(files):
            return 1
        changed = sum(not _store_unchanged(uploader, path, key, args.cls) for path, key in files)
        if changed:
            print(f"mogile-middleware: {changed} file(s) changed since the tree was read: not stored", file=sys.stderr)
            return 1
    elif args.source == "-":
        if args.key.endswith("/"):  # stored under the folder's own name, which no file of it names
            print("mogile-middleware: upload: KEY ends with / (a folder), and stdin has no name to add: give the "
                  "whole key", file=sys.stderr)
            return 2
        with _named("stdin"):
            _store(uploader, args.key, _stdin(), args.cls)
    else:
        key = args.key + Path(os.path.abspath(args.source)).name if args.key.endswith("/") else args.key
        with open(args.source, "rb") as source, _named(args.source):
            _store(uploader, key, source, args.cls)
    return 0


def _store_unchanged(uploader: Uploader, path: Path, key: str, cls: str | None) -> bool:
    """Store a file of a tree read before; False, said on stderr, if it changed meanwhile: gone,
    no longer a regular file, or its size changing while read (a log being written: the key
    keeps what it held)."""
    try:
        source = _open_regular(path)
    except OSError as error:
        print(f"mogile-middleware: {printable(_describe(error))}: skipped", file=sys.stderr)
        return False
    with source, _named(str(path)):  # a read that fails names the file
        try:
            _store(uploader, key, source, cls)
        except UploadError as error:
            if not isinstance(error.__cause__, LengthMismatchError):
                raise
            print(f"mogile-middleware: {printable(str(path))}: its size changed while it was read: skipped",
                  file=sys.stderr)
            return False
    return True


def _open_regular(path: Path) -> BinaryIO:
    """``path`` opened to be read, or an OSError naming it if it is no longer a regular file (a
    file of a tree may change once the tree is read: a FIFO opened so would wait for a writer)."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # no effect on a regular file's reads
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        os.close(descriptor)
        raise OSError(errno.EINVAL, "no longer a regular file", str(path))
    return os.fdopen(descriptor, "rb")


def _unstorable(files: list[tuple[Path, str]]) -> int:
    """How many of the ``(file, key)`` pairs make a key no tracker takes or name a file that
    cannot be read, each named on stderr (before anything is stored: then nothing is; a file
    that changes later is passed over, named)."""
    bad = 0
    for path, key in files:
        try:
            check_key(key)
            reason = None if os.access(path, os.R_OK) else os.strerror(errno.EACCES)
        except BadKeyError as error:
            reason = str(error)
        if reason is not None:
            print(f"mogile-middleware: {printable(str(path))}: {reason}", file=sys.stderr)
            bad += 1
    if bad:
        print(f"mogile-middleware: nothing stored: {bad} file(s) make no key or cannot be read", file=sys.stderr)
    return bad


def _store(uploader: Uploader, key: str, source: BinaryIO, cls: str | None) -> None:
    """Upload ``source`` under ``key`` with a progress bar, then print the key and its size."""
    with ProgressBar(remaining_size(source), sys.stderr, label=key) as bar:
        size = uploader.upload(key, source, cls, progress=bar.update)
    _report(f"{size}\t{printable(key)}")


def _report(line: str) -> None:
    """Print a line of what was done, flushed (a later failure must not hide it). Once stdout's
    reader has gone (``| head -1``), the lines go nowhere and the work goes on: a tree was left
    half stored or fetched, with exit 0."""
    try:
        print(line, flush=True)
    except BrokenPipeError:
        detach_stdout()


def _stdin() -> BinaryIO:
    """stdin's bytes: its file read by :class:`InterruptibleReader`, not through its buffer,
    whose read of a quiet pipe waits for the whole piece, a SIGTERM that came between two of its
    system calls unheard meanwhile (stdin in memory, as a caller may set it, is read as it is)."""
    buffered = sys.stdin.buffer
    raw = getattr(buffered, "raw", None)
    return InterruptibleReader(raw) if isinstance(raw, io.FileIO) else buffered  # type: ignore[return-value]


def _files_under(root: Path) -> Iterator[tuple[Path, str]]:
    """Every regular file under ``root`` with its path relative to it in POSIX form, sorted per
    directory. What is passed over is named on stderr: a FIFO or a socket (which would block or
    fail), and a link to a directory (not followed, as a loop of them would never end)."""
    if not root.is_dir():
        root.stat()  # a path that is not there says so (FileNotFoundError) rather than "not a directory"
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(root))
    for directory, subdirectories, names in os.walk(root, onerror=_reraise):
        subdirectories.sort()
        for name in subdirectories:
            if os.path.islink(os.path.join(directory, name)):
                _passed_over(Path(directory, name), "a link to a directory")
        for name in sorted(names):
            path = Path(directory, name)
            if path.is_file():
                yield path, path.relative_to(root).as_posix()
            else:
                _passed_over(path, _not_stored_because(path))


def _not_stored_because(path: Path) -> str:
    """Why ``upload --recursive`` passes over ``path``, which is no regular file nor one linked to."""
    if path.is_symlink():
        try:
            path.stat()
        except OSError as error:  # Path.exists() is False for a loop too
            return "a loop of links" if error.errno == errno.ELOOP else "a link to nothing"
    return "not a regular file"


def _passed_over(path: Path, reason: str) -> None:
    """Name on stderr a file ``upload --recursive`` does not store, and why."""
    print(f"mogile-middleware: {printable(str(path))}: {reason}: skipped", file=sys.stderr)


def _reraise(error: OSError) -> None:
    raise error  # os.walk would otherwise skip an unreadable directory without a word


# -- get --------------------------------------------------------------------------------------


def _add_get_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``get``."""
    connection_options(parser)
    parser.add_argument("key", metavar="KEY", help="key to fetch (with --recursive: the prefix of the keys)")
    parser.add_argument(
        "-o", "--output", metavar="FILE", type=path_argument,
        help="write to FILE, replaced only once the whole content has arrived; - for stdout, also for a "
             "binary file on a terminal (default: stdout, text only on a terminal); with --recursive, the directory",
    )
    parser.add_argument("-r", "--recursive", action="store_true",
                        help="fetch every key starting with KEY into the directory -o DIR, as files named by the "
                             "rest of the key")


def _get(args: argparse.Namespace, client: Client) -> int:
    if args.recursive:
        return _get_recursive(args, client)
    if args.output is not None and args.output.endswith(("/", "/.")) and not os.path.isdir(args.output):
        # pathlib reads "file.txt/" as "file.txt", and replaced that file (cp refuses it too)
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), args.output)
    if args.output not in (None, "-"):
        _fetch_into(client, args.key, Path(args.output))
        return 0
    to_terminal = sys.stdout.isatty()  # where a bar would draw over the text
    with _download(client, args.key) as (length, chunks), \
            ProgressBar(None if to_terminal else length, sys.stderr, label=args.key) as bar:
        first = next(chunks, b"")
        if args.output is None and to_terminal and _binary(first):
            print(f"mogile-middleware: {quoted(args.key)} is binary: not written to the terminal "
                  f"(-o FILE writes it to a file, -o - here anyway)", file=sys.stderr)
            return 1
        stdout = _Output(sys.stdout.buffer, "stdout")
        _copy(first, chunks, stdout, bar)
        stdout.flush()
    return 0


def _check_directory(root: Path) -> None:
    """Raise the OSError naming ``root``, or the part of it at fault, if no directory is or can be
    made there: a file, a loop of links, a file or a link to nothing on its way (``file/sub``)."""
    for path in (root, *root.parents):  # up to the first part that is there
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            if os.path.islink(path):
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path)) from None
            continue
        if not stat.S_ISDIR(mode):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path))
        return


def _get_recursive(args: argparse.Namespace, client: Client) -> int:
    """Every key under the prefix into a file under ``-o DIR``; a key that would not name a file
    inside it (``..``, an empty segment, a NUL, a segment over 255 bytes), or none of whose
    replicas answered, is skipped, named (see :func:`_skipped`), and exit 1."""
    if args.output in (None, "-"):
        print("mogile-middleware: get --recursive: give the directory to write to with -o DIR", file=sys.stderr)
        return 2
    root, skipped = Path(args.output), 0
    _check_directory(root)  # before any key is fetched, to be refused by it
    written: set[Path] = set()  # "col/x" and "colx" both name x under the prefix "col"
    prefix = to_bytes(args.key)  # keys match it byte for byte: it may end inside a character
    for key in client.keys(prefix):
        parts = _file_name_parts(_local_name(to_bytes(key)[len(prefix):]), after_slash=args.key.endswith("/"))
        if parts is None:
            print(f"mogile-middleware: {quoted(key)} names no file under {printable(str(root))}: skipped",
                  file=sys.stderr)
            skipped += 1
            continue
        target = root.joinpath(*parts)
        if target in written:
            _skipped(key, f"its file {printable(str(target))} holds another key's, written before")
            skipped += 1
            continue
        try:
            _fetch_into(client, key, target, make_directory=True)
        except UnknownKeyError:  # deleted since it was listed
            continue
        except (FileExistsError, IsADirectoryError, NotADirectoryError,  # "a" and "a/b" both keys
                StorageError, _ChecksumMismatch) as error:  # no replica answered, or matched: the other keys may
            _skipped(key, _describe(error))
            skipped += 1
            continue
        written.add(target)
        _report(f"{target.stat().st_size}\t{printable(key)}")
    return 1 if skipped else 0


def _fetch_into(client: Client, key: str, target: Path, *, make_directory: bool = False) -> None:
    """Write ``key``'s file to ``target``, put in place only once whole (and its directory made,
    with ``make_directory``, once a replica answers), from replicas whose bytes match the
    checksum the tracker keeps (:func:`_past_rotted_replicas`). A device or a pipe, written as it
    is (``/dev/stdout``), is read into once, as stdout is: bytes written there are not taken back."""
    def fetch(rotted: list[str]) -> None:
        with _download(client, key, passing_over=rotted) as (length, chunks), \
                ProgressBar(length, sys.stderr, label=key) as bar:
            if make_directory:
                target.parent.mkdir(parents=True, exist_ok=True)
            with _replacing(target) as out:
                _copy(b"", chunks, out, bar)

    try:
        in_place = not stat.S_ISREG(target.stat().st_mode)
    except OSError:  # none yet, or none there can be: _replacing names why
        in_place = False
    if in_place:
        fetch([])
    else:
        _past_rotted_replicas(key, fetch)


def _past_rotted_replicas(key: str, attempt: Callable[[list[str]], None]) -> None:
    """``attempt(passing_over)``, again while the bytes it read do not match the file's checksum
    (:class:`_ChecksumMismatch`, named on stderr) and a replica is left that may hold them: one
    whose own bytes differ is passed over from then on; when a transfer cut midway had gone on
    from another, the bytes came from several and any of them may differ, so once no replica is
    left that no attempt read, each of those is read again on its own."""
    rotted: list[str] = []
    suspects: list[str] = []  # read with another when the bytes differed: each to be read alone
    while True:
        try:
            attempt(rotted + suspects)
            return
        except _ChecksumMismatch as error:
            if not error.read:  # an empty file: its checksum is wrong, not a replica
                raise
            (suspects if len(error.read) > 1 else rotted).extend(error.read)
            if not error.unread:  # every replica left has been read
                if not suspects:
                    raise
                suspects.pop(0)  # the next attempt reads it alone: every other is passed over
            print(f"mogile-middleware: {quoted(key)}: {printable(str(error))}: read again from another replica",
                  file=sys.stderr)


def _replicas(client: Client, key: str, passing_over: Sequence[str]) -> tuple[list[str], FileInfo]:
    """The replica URLs of ``key`` but ``passing_over``, and its ``file_info``, of the same
    version: two at most besides those, as the trackers list two by default (a third copy
    was never read when both listed differed)."""
    paths, info = client.current_version(key, pathcount=len(passing_over) + 2)
    return [url for url in paths if url not in passing_over], info


@contextmanager
def _download(client: Client, key: str, *,
              passing_over: Sequence[str] = ()) -> Iterator[tuple[int | None, Iterator[bytes]]]:
    """The length of ``key``'s file and its body chunk by chunk, the rest from a replica again
    when a transfer is cut midway (:class:`~mogile_middleware.storage.ResumedReplica`), checked
    against the MD5 the tracker keeps (:class:`_ChecksumCheck`). Only a replica of the length
    the tracker records is read: one cut short on its disk was written whole-looking. The
    replicas ``passing_over`` are not asked."""
    paths, info = _replicas(client, key, passing_over)
    with open_replica(paths, size=info.length, timeout=client.storage_timeout) as body:
        resumption = Resumption(paths, None, info.length, same_bytes=names_a_fid(paths))
        resumed = ResumedReplica(body, resumption, timeout=client.storage_timeout)
        try:
            yield body.length, _checked(resumed, _ChecksumCheck.of(info.checksum, paths))
        finally:
            resumed.close()


def _checked(resumed: ResumedReplica, check: _ChecksumCheck | None) -> Iterator[bytes]:
    """The chunks of ``resumed``, then ``check``'s verdict, before the file written is put in place."""
    for chunk in resumed.iter_chunks():
        if check is not None:
            check.add(chunk, resumed.url)
        yield chunk
    if check is not None:
        check.verify()


class _ChecksumMismatch(MogileFSError):
    """The bytes of the replicas ``read`` do not match the file's checksum; ``unread`` are the others.
    Not a :class:`StorageError`, which an upload reading them takes for a destination's and sends
    again to the next."""

    def __init__(self, message: str, read: list[str], unread: list[str]) -> None:
        super().__init__(message)
        self.url, self.status = read[0] if read else "", None
        self.read = read
        self.unread = unread


class _ChecksumCheck:
    """The MD5 of a file's bytes as they are read, in order, against ``checksum``, the tracker's:
    a replica that rotted on its disk (the same length, other bytes) raises a :class:`_ChecksumMismatch`
    before what was read is put in place (a file written, a copy stored), as a transfer cut short does."""

    def __init__(self, checksum: str, paths: list[str]) -> None:
        self._checksum = checksum
        self._paths = paths
        self._digest = hashlib.md5(usedforsecurity=False)
        self._read: list[str] = []  # the replicas the bytes came from, in order

    @classmethod
    def of(cls, checksum: str | None, paths: list[str]) -> _ChecksumCheck | None:
        """The check of a file of ``checksum`` at ``paths``; ``None`` if the tracker keeps no MD5 of it."""
        return cls(checksum, paths) if checksum is not None and checksum.startswith(_MD5) else None

    def restart(self) -> None:
        """Forget the bytes added: the file is read again from its start."""
        self._digest, self._read = hashlib.md5(usedforsecurity=False), []

    def add(self, data: bytes | memoryview, url: str) -> None:
        """``data``, the next bytes of the file, read from the replica at ``url``."""
        self._digest.update(data)
        if data and (not self._read or self._read[-1] != url):
            self._read.append(url)

    def verify(self) -> None:
        """Raise the :class:`_ChecksumMismatch` naming the replicas read (each once: a transfer
        cut twice may go back to the first) if the bytes added do not match."""
        digest, read = self._digest.hexdigest(), list(dict.fromkeys(self._read))
        if digest != self._checksum[len(_MD5):].lower():
            raise _ChecksumMismatch(f"the content read from {', '.join(read) or 'no replica (an empty file)'} does "
                                    f"not match its checksum {self._checksum} (MD5:{digest} read)", read,
                                    [url for url in self._paths if url not in read])


#: How mogilefsd writes an MD5 checksum (``file_info``): ``MD5:`` and 32 hexadecimal digits.
_MD5 = "MD5:"


#: What no file name here holds, besides the "/" a key's segments are split at: NUL, and the
#: backslash where it also separates directories (Windows).
_NOT_IN_FILE_NAMES = ("\0", os.sep) if os.sep != "/" else ("\0",)
#: The longest file name (bytes) Linux file systems take.
_NAME_MAX = 255


def _local_name(data: bytes) -> str:
    """Key bytes as a file name, as ``upload --recursive`` made a key of one: its text in the
    locale's encoding, or its bytes where that cannot hold the text (``LC_ALL=C``: ASCII)."""
    text = to_text(data)
    try:
        os.fsencode(text)
    except UnicodeEncodeError:
        return os.fsdecode(data)
    return text


def _file_name_parts(rest: str, *, after_slash: bool) -> list[str] | None:
    """The path segments of a key after the prefix, or None if they would not name a file inside
    the directory: a key is written by whoever stored it, and may be hostile. Any other name is
    kept as it is (a tab, a line feed, a byte that is not UTF-8): ``upload --recursive`` stores
    most such files, and the Perl tools the rest."""
    if rest.startswith("/") and not after_slash:  # prefix "photos", key "photos/a.jpg"
        rest = rest[1:]
    parts = rest.split("/")
    if (any(part in ("", ".", "..") or len(os.fsencode(part)) > _NAME_MAX for part in parts)
            or any(byte in rest for byte in _NOT_IN_FILE_NAMES)):
        return None
    return parts


def _binary(data: bytes) -> bool:
    """True if ``data`` (the start of a file) is not text a terminal shows as it is."""
    try:
        data[:4096].decode("utf-8")
    except UnicodeDecodeError as error:
        if error.start < min(len(data), 4096) - 3:  # not just a character cut at the end
            return True
    return b"\0" in data[:4096]


def _copy(first: bytes, rest: Iterator[bytes], target: _Output, bar: ProgressBar) -> None:
    done = 0
    for chunk in itertools.chain([first], rest):
        target.write(chunk)
        done += len(chunk)
        bar.update(done)


#: What the temporary file beside a target keeps of its name: with its dot, random part and
#: ``.part`` (15 bytes), a target of 255 bytes (most file systems' longest name) still has one.
_PART_STEM_BYTES = 240


class _Output:
    """A binary file whose write errors name ``name``: the user's path, not a temporary file's
    (a full disk said only "No space left on device")."""

    def __init__(self, file: IO[bytes], name: str) -> None:
        self._file = file
        self._name = name

    def write(self, data: bytes) -> None:
        with _named(self._name):
            self._file.write(data)

    def flush(self) -> None:
        with _named(self._name):
            self._file.flush()


@contextmanager
def _named(name: str, *, instead: bool = False) -> Iterator[None]:
    """Inside the block, an OSError that names no file names ``name``; with ``instead``, whatever
    file it named (a temporary one: the user knows the path they gave)."""
    try:
        yield
    except OSError as error:
        if error.errno is None or error.filename is not None and not instead:
            raise
        raise type(error)(error.errno, error.strerror, name) from None


@contextmanager
def _written(file: IO[bytes], name: str) -> Iterator[_Output]:
    """``file`` written through an :class:`_Output` naming ``name``, flushed and closed after the
    block. Closed after an error, it flushes the same bytes again: its own error, naming nothing,
    must not hide the first."""
    output = _Output(file, name)
    try:
        yield output
        output.flush()  # a full disk shows here at the latest, named
    except BaseException:
        with suppress(OSError):
            file.close()
        raise
    with _named(name):
        file.close()


@contextmanager
def _replacing(path: Path) -> Iterator[_Output]:
    """A temporary file beside ``path``, renamed to it only when the block completes: a failure
    leaves neither a partial file nor a changed one. As ``cp`` does, a symbolic link is written
    through, a file keeps its mode, and a device or a pipe (``/dev/null``) is written as it is."""
    try:
        mode: int | None = path.stat().st_mode
    except FileNotFoundError:
        if path.is_symlink():  # cp refuses it too: the file would be made wherever the link points
            raise FileNotFoundError(errno.ENOENT, "a link to nothing, not written through", str(path)) from None
        mode = None
    except OSError as error:
        raise type(error)(error.errno, error.strerror, str(path)) from None
    if mode is not None and stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, "is a directory: give a file name", str(path))
    if mode is not None and not stat.S_ISREG(mode):
        with _written(open(path, "wb"), str(path)) as output:  # noqa: SIM115 # closed by _written
            yield output
        return
    if mode is not None and not os.access(path, os.W_OK):  # the directory would let it be replaced
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
    real = Path(os.path.realpath(path))
    stem = os.fsdecode(os.fsencode(real.name)[:_PART_STEM_BYTES])  # a name of 255 bytes too
    try:
        with _named(str(path), instead=True):
            handle = tempfile.NamedTemporaryFile(dir=real.parent, prefix=f".{stem}.", suffix=".part", delete=False)
    except PermissionError as error:
        if mode is None:
            raise
        # The file is writable (checked above): the directory, where it is made anew, is not.
        directory = real.parent if path.is_symlink() else path.parent
        raise PermissionError(error.errno, f"{error.strerror} (to make {path} anew there)", str(directory)) from None
    try:
        with _written(handle, str(path)) as output:
            yield output
        with _named(str(path), instead=True):
            # The file's own permissions (not its setuid bits), or as open() would create it: not
            # private like a temporary file.
            os.chmod(handle.name, mode & 0o777 if mode is not None else 0o666 & ~_umask())
            os.replace(handle.name, real)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def _umask() -> int:
    umask = os.umask(0)  # reading the umask means setting it: put it straight back
    os.umask(umask)
    return umask


# -- ls, info, paths, rm, mv ------------------------------------------------------------------


def _add_ls_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``ls``."""
    connection_options(parser)
    parser.add_argument("prefix", metavar="PREFIX", nargs="?", default="", help="list only keys starting with it")
    parser.add_argument("-l", "--long", action="store_true", help="print size<TAB>class<TAB>key")
    parser.add_argument("-0", "--null", action="store_true",
                        help="end each key with a NUL byte, not a line feed, and print it as it is, without escapes "
                             "(for xargs -0)")


def _ls(args: argparse.Namespace, client: Client) -> int:
    """Print the keys under the prefix; with ``--long``, each with its size and class. One a
    line, with escapes (a key may hold a line feed or a backslash); with ``--null`` as they are,
    each ended by a NUL: what another command takes back. A key holding a NUL itself (the Perl
    client stores one) is then named on stderr and passed over, exit 1."""
    raw, skipped = _Output(sys.stdout.buffer, "stdout") if args.null else None, 0
    for key in client.keys(args.prefix):
        if raw is not None and "\0" in key:
            _skipped(key, "it holds a NUL, which ends a key with --null")
            skipped += 1
            continue
        fields = [key]
        if args.long:
            try:
                info = client.file_info(key)
            except UnknownKeyError:  # deleted since it was listed
                continue
            fields = [str(info.length), info.cls, key]
        if raw is None:
            print("\t".join(map(printable, fields)))
        else:
            raw.write(to_bytes("\t".join(fields)) + b"\0")
    if raw is not None:
        raw.flush()
    return 1 if skipped else 0


def _add_key_argument(parser: argparse.ArgumentParser) -> None:
    """Options of ``info`` and ``paths``: the connection and one key."""
    connection_options(parser)
    parser.add_argument("key", metavar="KEY")


def _add_rm_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``rm``."""
    _write_options(parser)
    parser.add_argument("keys", metavar="KEY", nargs="*", help="keys to delete")
    listed = parser.add_mutually_exclusive_group()
    listed.add_argument("--prefix", type=_prefix_argument,
                        help="delete every key starting with PREFIX (asks first, unless --yes)")
    listed.add_argument("--all", dest="prefix", action="store_const", const="",
                        help="delete every key of the domain (asks first, unless --yes)")
    parser.add_argument("-y", "--yes", action="store_true", help="do not ask before deleting by --prefix or --all")


def _prefix_argument(value: str) -> str:
    """The prefix of the keys ``rm`` deletes. An empty one (an unset variable) is refused: it
    named every key of the domain, and with ``--yes`` deleted them all without a word."""
    if not value:
        raise argparse.ArgumentTypeError("an empty prefix (give --all to delete every key of the domain)")
    return value


def _all_paths(client: Client, info: FileInfo) -> list[str]:
    """The URLs of every replica of the key (the tracker gives two unless asked for more)."""
    return client.get_paths(info.key, pathcount=max(info.devcount, 1))  # none left: still ask (a file lost)


def _info(args: argparse.Namespace, client: Client) -> int:
    info = client.file_info(args.key)
    fields: list[tuple[str, object]] = [
        ("key", info.key), ("domain", info.domain), ("fid", info.fid), ("length", info.length),
        ("class", info.cls), ("devcount", info.devcount),
    ]
    if info.checksum:
        fields.append(("checksum", info.checksum))
    fields += [("path", path) for path in _all_paths(client, info)]
    for name, value in fields:
        print(f"{name:<9}{printable(str(value))}")
    return 0


def _paths(args: argparse.Namespace, client: Client) -> int:
    for path in _all_paths(client, client.file_info(args.key)):
        print(printable(path))
    return 0


def _rm(args: argparse.Namespace, client: Client) -> int:
    """Delete the keys given, then (with ``--prefix``) those listed under it, once confirmed (a
    prefix no key starts with is said, and not an error). A key that does not exist (exit 3), or
    that no key can be (exit 1: an empty one, see :func:`_skipped`), is reported and the others
    still deleted."""
    if not args.keys and args.prefix is None:
        print("mogile-middleware: rm: give keys, --prefix PREFIX or --all", file=sys.stderr)
        return 2
    keys = list(args.keys)
    if args.prefix is not None:
        listed = list(client.keys(args.prefix))
        which = (f"starting with {quoted(args.prefix)}" if args.prefix
                 else f"of the domain {quoted(client.domain)}")
        if not listed:  # nothing to ask about
            print(f"mogile-middleware: rm: no key {which}", file=sys.stderr)
        elif not _confirmed(f"delete the {len(listed)} key(s) {which}", args.yes):
            print("mogile-middleware: rm: nothing deleted", file=sys.stderr)
            return 1
        keys = list(dict.fromkeys(keys + listed))  # a key given and listed is deleted once
    missing = skipped = 0
    for key in keys:
        try:
            client.delete(key)
        except UnknownKeyError as error:
            print(f"mogile-middleware: {shown(error)}", file=sys.stderr)
            missing += 1
        except BadKeyError as error:
            _skipped(key, str(error))
            skipped += 1
    return 1 if skipped else 3 if missing else 0


def _confirmed(question: str, yes: bool) -> bool:
    """True with ``--yes``; else the answer to ``question`` on a terminal (never without one)."""
    if yes:
        return True
    if not sys.stdin.isatty():
        print(f"mogile-middleware: rm: {question}? Not on a terminal to ask: pass --yes", file=sys.stderr)
        return False
    print(f"{question}? [y/N] ", end="", file=sys.stderr, flush=True)
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def _add_cp_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``cp``."""
    _write_options(parser)
    parser.add_argument("key", metavar="FROM", help="key to copy")
    parser.add_argument("to", metavar="TO", help="key to write (replaced if it exists)")
    parser.add_argument("--class", dest="cls", metavar="CLASS", help="class of the copy (default: FROM's)")


def _cp(args: argparse.Namespace, client: Client) -> int:
    """Stream FROM's content into TO, which points at it only once the whole copy is stored."""
    def copy(rotted: list[str]) -> None:
        paths, info = _replicas(client, args.key, rotted)
        # Read as get reads: a replica of the tracker's length, resumed from the next when cut
        # midway, checked against the tracker's MD5, and rewound when a destination node drops the copy.
        with _CheckedBody(paths, length=info.length, timeout=client.storage_timeout,
                          check=_ChecksumCheck.of(info.checksum, paths)) as source:
            _store(Uploader(client), args.to, source, args.cls or info.cls)  # type: ignore[arg-type]

    _past_rotted_replicas(args.key, copy)
    return 0


class _CheckedBody(SeekableBody):
    """A :class:`~mogile_middleware.storage.SeekableBody` whose bytes, read in order from the
    start (again after a rewind), go to ``check``: its last read raises instead of giving the
    last bytes when they do not match, so an upload reading it stores nothing."""

    def __init__(self, urls: list[str], *, length: int, timeout: float, check: _ChecksumCheck | None) -> None:
        super().__init__(urls, length=length, timeout=timeout)
        self._check = check
        self._checked = 0  # the bytes the check has, from the start

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        at = self.tell()
        count = super().readinto(buffer)
        if self._check is not None and (count or not self.length):  # an empty file is checked too
            if at == 0:  # rewound, or the first read
                self._check.restart()
                self._checked = 0
            if at == self._checked:
                self._check.add(memoryview(buffer)[:count], self.url)  # type: ignore[arg-type]
                self._checked += count
                if self._checked == self.length:
                    self._check.verify()
        return count


def _add_mv_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``mv``."""
    _write_options(parser)
    parser.add_argument("key", metavar="FROM", help="key to rename")
    parser.add_argument("to", metavar="TO", help="new name; it must not exist")


def _mv(args: argparse.Namespace, client: Client) -> int:
    client.rename(args.key, args.to)
    return 0


def _add_check_arguments(parser: argparse.ArgumentParser) -> None:
    connection_options(parser)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--timeout", type=_seconds, default=3.0, metavar="SECONDS",
                        help="timeout of each connection and each answer of a tracker or storage node; trackers "
                             "and nodes are asked at once, each tracker six requests in turn (default: 3)")


def _seconds(text: str) -> float:
    """A timeout given on the command line: a number of seconds above 0, at most a year."""
    try:
        return checked_seconds("the timeout", float(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


@_local_errors
def _check(args: argparse.Namespace) -> int:
    """Print the health report; each problem also as one line on stderr; exit 1 if there is any."""
    report = health.check(args.trackers, args.domain, timeout=args.timeout)
    unprinted: OSError | None = None
    try:
        if args.json:
            json.dump(report.as_dict(), sys.stdout, indent=2)
            print()
        else:
            _print_health(report)
        sys.stdout.flush()
    except OSError as error:  # the problems are said and decide the exit status all the same
        unprinted = error
    for problem in report.problems:
        print(f"mogile-middleware: check: {printable(problem)}", file=sys.stderr)
    if unprinted is None:
        return 1 if report.problems else 0
    if isinstance(unprinted, BrokenPipeError) and report.problems:  # `check | head` with problems: exit 1
        detach_stdout()
        return 1
    raise unprinted


def _print_health(report: health.Health) -> None:
    print("trackers:")
    for tracker in report.trackers:
        state = f"FAILED  {tracker.error}" if tracker.error else f"OK  {tracker.rtt_ms:.2f} ms"
        print(f"  {tracker.address}  {printable(state)}")
    if report.classes is None:
        classes = "classes unknown"
    else:
        classes = ", ".join(f"{name} ({copies} cop{'y' if copies == 1 else 'ies'})"
                            for name, copies in report.classes.items()) or "no classes"
    print(f"domain {printable(report.domain)}: {printable(classes)}")
    print("hosts:")
    for host in report.hosts:  # all the trackers' words, any of which may hold an escape sequence
        print(f"  [{printable(host.hostid)}] {printable(host.name)}  {printable(host.address)}  "
              f"{printable(host.status)}")
    print("devices:")
    for device in report.devices:
        space = "" if device.mb_free is None else f"  {device.mb_free / 1024:.1f} of {(device.mb_total or 0) / 1024:.1f} GiB free"
        silent = "  does not answer HTTP" if device.answers_http is False else ""  # as mogadm marks it
        print(f"  [dev{device.devid}] {printable(device.host)}  {printable(device.status)}  "
              f"{printable(device.observed or 'not yet seen')}{space}{silent}")
    print(f"{len(report.problems)} problem(s)" if report.problems else "all well")


#: name → (one-line help, add_arguments, run), merged into :data:`cli.SUBCOMMANDS`.
SUBCOMMANDS: dict[str, Subcommand] = {
    "upload": ("store a file, stdin or a directory tree under keys", _add_upload_arguments, _command(_upload)),
    "get": ("write a key's content to a file or stdout, checked against its MD5 where the tracker keeps one",
            _add_get_arguments, _command(_get)),
    "ls": ("list the keys, or those starting with a prefix", _add_ls_arguments, _command(_ls)),
    "info": ("show a key's fid, length, class, replicas, checksum and paths", _add_key_argument, _command(_info)),
    "paths": ("print the URLs of a key's replicas, one a line", _add_key_argument, _command(_paths)),
    "rm": ("delete keys, or every key under a prefix", _add_rm_arguments, _command(_rm)),
    "mv": ("rename a key", _add_mv_arguments, _command(_mv)),
    "cp": ("copy a key's content to another key, in its class or another", _add_cp_arguments, _command(_cp)),
    "check": ("check the trackers, the domain's classes, the hosts and the devices (like mogadm check); "
              "exit 1 with a line per problem", _add_check_arguments, _check),
}
