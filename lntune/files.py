"""Files that stay whole: atomic writes, folders published in one step, locks, and checked exports.

A process killed at any moment (kill -9) leaves what these functions write either as it was or as it
was meant to become, never torn or half of each: files are written beside their destination and
renamed over it, and a folder is built beside its destination and exchanged with it in one
renameat2(RENAME_EXCHANGE). Needs only the standard library (the runner imports it with the TVM
runtime alone).

An export folder holds lntune.so and manifest.json; `read_manifest` checks both before anything is
loaded (a library cut short would kill the process with SIGBUS when dlopen maps it).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import stat
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

LIBRARY = "lntune.so"
MANIFEST = "manifest.json"
EXPORT_FILES = (LIBRARY, MANIFEST)
STAGING_SUFFIX = ".staging"  # a folder being built beside its destination
PREVIOUS_SUFFIX = ".previous"  # the replaced folder, until it is deleted

# What a manifest may name; kept here (not imported from te_ops) so the runtime-only runner can check.
DEVICES = ("cpu", "cuda", "rocm")
OPS = ("forward", "forward_stats", "backward", "backward_sum")
DTYPES = ("float32", "float16", "bfloat16")


class LibraryError(ValueError):
    """An export folder that cannot be loaded; the message is one line naming the file and the fault."""


# -- atomic files ----------------------------------------------------------------------------------


def fsync_directory(directory: Path) -> None:
    """Make a rename in `directory` durable (the entry, not only the file's data)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Replace `path` with `data` in one step: a reader (or a crash) sees the old file or the new one."""
    path = Path(path)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temporary, 0o644)  # mkstemp's 0600 would hide the file from other users
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    fsync_directory(path.parent)


def write_text_atomic(path: Path, text: str) -> None:
    """write_bytes_atomic of `text` in UTF-8."""
    write_bytes_atomic(path, text.encode())


# -- locks -----------------------------------------------------------------------------------------


def lock_path(target: Path) -> Path:
    """The lock file that guards the folder `target`: beside it, since the folder itself is replaced."""
    target = Path(target)
    return target.parent / f".{target.name}.lock"


@contextlib.contextmanager
def locked(path: Path, wait: bool = True, on_wait: Callable[[Path], None] | None = None) -> Iterator[None]:
    """Hold an exclusive fcntl lock on the file `path` (created if missing, removed on release).

    With wait=False a held lock raises BlockingIOError at once; otherwise `on_wait(path)` is called
    (say, to print that another process holds it) and the call blocks until the lock is free. The
    lock is the file's inode: a holder removes the file before it unlocks, so a waiter that then
    gets the lock on the removed inode sees the path gone (or another inode there) and tries again.
    """
    path = Path(path)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    raise
                if on_wait is not None:
                    on_wait(path)
                fcntl.flock(fd, fcntl.LOCK_EX)
            if _same_file(path, fd):
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)  # releases the lock


def _same_file(path: Path, fd: int) -> bool:
    try:
        named, held = os.stat(path), os.fstat(fd)
    except FileNotFoundError:
        return False
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


# -- folders published in one step -----------------------------------------------------------------

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (renameat2 RENAME_EXCHANGE); False where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except AttributeError:  # a C library without renameat2 (glibc < 2.28, musl)
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # this file system cannot exchange
    raise OSError(code, f"cannot exchange {a} with {b}: {os.strerror(code)}")


def publish_directory(staging: Path, target: Path) -> None:
    """Make the folder `target` what the folder `staging` holds, in one step, then delete the old.

    `staging` must sit beside `target` (one file system; `staged_directory` makes one). A reader, or
    a crash, sees the old folder whole or the new one whole: the two are exchanged atomically, and
    the old one, now at the staging name, is deleted after. Where the file system cannot exchange,
    the old folder is renamed aside first (a crash between the two renames leaves it at
    `*.previous`, which `clean_staging` puts back). Call it holding the target's lock.
    """
    staging, target = Path(staging), Path(target)
    if not os.path.lexists(target):
        os.rename(staging, target)
        fsync_directory(target.parent)
    elif _exchange(staging, target):
        fsync_directory(target.parent)
        shutil.rmtree(staging)  # the previous folder, now at the staging name
    else:
        previous = staging.with_name(staging.name.removesuffix(STAGING_SUFFIX) + PREVIOUS_SUFFIX)
        os.rename(target, previous)
        os.rename(staging, target)
        fsync_directory(target.parent)
        shutil.rmtree(previous)


@contextlib.contextmanager
def staged_directory(target: Path) -> Iterator[Path]:
    """An empty folder beside `target` to build in; published as `target` when the block ends
    normally (publish_directory), removed when it raises. Hold the target's lock around it."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.{secrets.token_hex(6)}{STAGING_SUFFIX}"
    os.mkdir(staging)  # not mkdtemp: its 0700 would become the published folder's mode
    if target.is_dir():
        os.chmod(staging, stat.S_IMODE(target.stat().st_mode))
    try:
        yield staging
        for name in os.listdir(staging):
            if os.path.isfile(staging / name):
                _fsync_file(staging / name)
        publish_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def clean_staging(target: Path) -> list[Path]:
    """Remove what killed runs left beside `target` (staging folders, a replaced folder not yet
    deleted), first putting a replaced folder back when `target` itself is missing. Call it holding
    the target's lock, before staging anew. Returns the paths removed."""
    target = Path(target)
    if not target.parent.is_dir():
        return []
    prefix = f".{target.name}."
    leftovers = sorted(
        target.parent / name
        for name in os.listdir(target.parent)
        if name.startswith(prefix) and name.endswith((STAGING_SUFFIX, PREVIOUS_SUFFIX))
    )
    previous = [p for p in leftovers if p.name.endswith(PREVIOUS_SUFFIX)]
    if previous and not os.path.lexists(target):
        os.rename(previous[0], target)  # the crash fell between the fallback's two renames
        leftovers.remove(previous[0])
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    return leftovers


def output_directory(path: str | os.PathLike) -> Path:
    """An export destination, checked before any work: `~` expanded, made absolute (symlinks
    resolved), and a folder that can be created or replaced as a whole. Raises ValueError naming the
    path: empty, a file in the way, a path under a file, a parent that cannot be written, a mount
    point, a folder holding other folders, or the current directory."""
    text = os.fspath(path)
    if not str(text).strip():
        raise ValueError(f"the output folder must be a non-empty path, got {text!r}")
    try:
        return _checked_output(Path(os.path.expanduser(text)).resolve())
    except (OSError, RuntimeError) as err:  # a folder on the way that cannot be read, a symlink loop
        raise ValueError(f"output folder {text}: {getattr(err, 'strerror', None) or err}") from None


def _checked_output(out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise ValueError(f"output folder {out} is a file; give a folder (new or a previous export)")
    if out == out.parent or os.path.ismount(out):
        raise ValueError(f"output folder {out} is a mount point; export replaces its folder whole: give one inside")
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"output folder {out} cannot be created: {existing} is a file")
    writable = existing if existing != out else out.parent
    if not os.access(writable, os.W_OK | os.X_OK):
        raise ValueError(f"output folder {out} cannot be written: no write permission in {writable}")
    if out.is_dir():
        if out == Path.cwd().resolve():
            raise ValueError(f"output folder {out} is the current directory; export replaces its folder whole")
        folders = sorted(e.name for e in os.scandir(out) if e.is_dir(follow_symlinks=False))
        if folders:
            raise ValueError(
                f"output folder {out} holds folders ({', '.join(folders[:3])}); export replaces its folder "
                "whole, so give it a folder of its own"
            )
    return out


def carry_other_files(old: Path, staging: Path) -> list[str]:
    """Hard-link into `staging` the files of `old` that an export does not write (a note, a check
    log), so publishing the new export keeps them. Returns their names."""
    if not Path(old).is_dir():
        return []
    names = []
    for entry in os.scandir(old):
        if entry.name in EXPORT_FILES or entry.is_dir(follow_symlinks=False):
            continue
        try:
            os.link(entry.path, Path(staging) / entry.name, follow_symlinks=False)
        except OSError:  # a file system without hard links, or another user's file (protected_hardlinks)
            shutil.copy2(entry.path, Path(staging) / entry.name, follow_symlinks=False)
        names.append(entry.name)
    return names


# -- export folders --------------------------------------------------------------------------------


def library_directory(path: str | os.PathLike) -> Path:
    """The export folder named by `path`: the folder itself or its lntune.so; `~` expanded."""
    path = Path(os.path.expanduser(os.fspath(path)))
    return path.parent if path.suffix == ".so" else path


def file_digest(path: Path) -> str:
    """sha256 of a file, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(directory: Path) -> dict:
    """The manifest of an export folder, checked: valid JSON, every field the runner uses of the right
    type, each variant complete (its four kernels), and the library whole (the size and sha256 the
    manifest records, and an ELF whose mapped segments the file holds). A variant's "param_dtype"
    defaults to its "dtype". Raises LibraryError, one line naming the file and what is wrong."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise LibraryError(f"{directory}: no such folder (run `lntune export` first)")
    if not path.is_file():
        raise LibraryError(f"{path}: missing; {directory} is no lntune export (run `lntune export` first)")
    try:
        manifest = json.loads(path.read_bytes().decode())
    except UnicodeDecodeError as err:
        raise LibraryError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise LibraryError(f"{path}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno})") from None
    _check_manifest(manifest, path)
    check_library_file(directory / LIBRARY, manifest)
    return manifest


def _fail(path: Path, what: str) -> LibraryError:
    return LibraryError(f"{path}: {what}")


def _is_int(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _check_manifest(manifest: Any, path: Path) -> None:
    if not isinstance(manifest, dict):
        raise _fail(path, f"must hold a JSON object, got {type(manifest).__name__}")
    for key in ("target", "device"):
        if not isinstance(manifest.get(key), str) or not manifest[key]:
            raise _fail(path, f"{key!r} must be a non-empty string, got {manifest.get(key)!r}")
    if manifest["device"] not in DEVICES:
        raise _fail(path, f"'device' must be one of {list(DEVICES)}, got {manifest['device']!r}")
    for key, kind in (("target_spec", dict), ("device_code", str), ("lntune_version", str), ("tvm_version", str)):
        if key in manifest and not isinstance(manifest[key], kind):
            raise _fail(path, f"{key!r} must be a {kind.__name__}, got {manifest[key]!r}")
    if "library_bytes" in manifest and not _is_int(manifest["library_bytes"], 0):
        raise _fail(path, f"'library_bytes' must be an integer >= 0, got {manifest['library_bytes']!r}")
    digest = manifest.get("library_sha256")
    if "library_sha256" in manifest and not (
        isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)
    ):
        raise _fail(path, f"'library_sha256' must be 64 lowercase hex digits, got {digest!r}")
    variants = manifest.get("variants")
    if not isinstance(variants, list) or not variants:
        raise _fail(path, f"'variants' must be a non-empty list, got {variants!r}")
    kernels: dict[tuple, dict] = {}
    for i, variant in enumerate(variants):
        key = _check_variant(variant, f"variants[{i}]", path)
        if key in kernels:
            raise _fail(path, f"variants[{i}] repeats {key[0]} hidden={key[1]} dtype={key[2]}:{key[3]}")
        kernels[key] = variant
    _check_complete(kernels, path)


def _check_variant(variant: Any, where: str, path: Path) -> tuple:
    if not isinstance(variant, dict):
        raise _fail(path, f"{where} must be an object, got {variant!r}")
    variant.setdefault("param_dtype", variant.get("dtype"))
    checks = (
        ("op", lambda v: v in OPS, f"one of {list(OPS)}"),
        ("hidden", lambda v: _is_int(v, 1), "a positive integer"),
        ("dtype", lambda v: v in DTYPES, f"one of {list(DTYPES)}"),
        ("param_dtype", lambda v: v in DTYPES, f"one of {list(DTYPES)}"),
        ("function", lambda v: isinstance(v, str) and v.isidentifier(), "a function name"),
        ("parts", lambda v: _is_int(v, 0), "an integer >= 0"),
    )
    for key, ok, expected in checks:
        if key not in variant or not ok(variant[key]):
            raise _fail(path, f"{where}.{key} must be {expected}, got {variant.get(key)!r}")
    if variant["op"].startswith("backward") and variant["parts"] < 1:
        raise _fail(path, f"{where}.parts must be >= 1 for a {variant['op']}, got {variant['parts']!r}")
    for key, kind in (("schedule", str), ("knobs", dict)):
        if key in variant and not isinstance(variant[key], kind):
            raise _fail(path, f"{where}.{key} must be a {kind.__name__}, got {variant[key]!r}")
    if "granule" in variant and not _is_int(variant["granule"], 1):
        raise _fail(path, f"{where}.granule must be a positive integer, got {variant['granule']!r}")
    return variant["op"], variant["hidden"], variant["dtype"], variant["param_dtype"]


def _check_complete(kernels: dict[tuple, dict], path: Path) -> None:
    """Each (hidden, dtype, param_dtype) needs all four kernels, and its backward and sum one P."""
    for _, hidden, dtype, param in sorted(set(kernels)):
        missing = [op for op in OPS if (op, hidden, dtype, param) not in kernels]
        if missing:
            raise _fail(path, f"hidden={hidden} dtype={dtype}:{param} lacks its {', '.join(missing)} kernel")
        parts = {kernels[(op, hidden, dtype, param)]["parts"] for op in ("backward", "backward_sum")}
        if len(parts) != 1:
            raise _fail(path, f"hidden={hidden} dtype={dtype}:{param}: backward and backward_sum disagree on P")


def check_library_file(library: Path, manifest: dict) -> None:
    """The library is a whole file: the size and sha256 the manifest records (when it records them),
    and an ELF whose headers and mapped segments lie within the file. Raises LibraryError."""
    if not library.is_file():
        raise _fail(library, "missing (run `lntune export` again)")
    size = library.stat().st_size
    recorded = manifest.get("library_bytes")
    if recorded is not None and size != recorded:
        raise _fail(library, f"is {size} bytes, but the manifest records {recorded} (cut short or replaced)")
    if "library_sha256" in manifest and file_digest(library) != manifest["library_sha256"]:
        raise _fail(library, "its sha256 differs from the manifest's (damaged or replaced)")
    check_elf(library)


def check_elf(path: Path) -> None:
    """An ELF64 little-endian shared object whose header tables and loadable segments the file holds
    (dlopen maps them: a segment past the end of the file faults with SIGBUS when touched)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        header = f.read(64)
        if len(header) < 64 or header[:4] != b"\x7fELF":
            raise _fail(path, f"is not an ELF shared library ({size} bytes)")
        if header[4] != 2 or header[5] != 1:
            raise _fail(path, "is not a 64-bit little-endian ELF")
        phoff, shoff = struct.unpack_from("<QQ", header, 0x20)
        phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", header, 0x36)
        ends = [phoff + phentsize * phnum, shoff + shentsize * shnum]
        if ends[0] <= size and phentsize >= 56:
            f.seek(phoff)
            table = f.read(phentsize * phnum)
            for i in range(phnum):
                kind, _flags, offset, _vaddr, _paddr, filesz = struct.unpack_from("<IIQQQQ", table, i * phentsize)
                if kind == 1:  # PT_LOAD
                    ends.append(offset + filesz)
    if max(ends) > size:
        raise _fail(path, f"is cut short: its ELF headers reach byte {max(ends)}, the file has {size}")


# dlopen returns the library a process already has open under the same path, whatever the file at that
# path is now: in one process, an export loaded, exported again and loaded again runs the old code.
_OPENED: dict[str, tuple[int, ...]] = {}  # path -> the version of the file first opened there
_COPIES: list[str] = []


def loadable_path(library: Path) -> str:
    """The path to dlopen `library` by in this process: its own, unless this process opened another
    file under that path before (an earlier export at the same place); then a private copy of this
    one (removed at exit), so the current library is what loads."""
    path = str(Path(library).resolve())
    info = os.stat(path)
    version = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)  # an inode number is reused
    if _OPENED.setdefault(path, version) == version:
        return path
    if not _COPIES:
        _COPIES.append(tempfile.mkdtemp(prefix="lntune-libraries-"))
        atexit.register(shutil.rmtree, _COPIES[0], True)
    copy = Path(_COPIES[0]) / ("-".join(map(str, version)) + "-" + Path(path).name)
    if not copy.exists():
        shutil.copyfile(path, copy)
    return str(copy)


def check_functions(manifest: dict, module: Any, path: Path) -> None:
    """Every function the manifest names is in the loaded `module` (a tvm.runtime.Module), else a
    LibraryError naming `path` (the library or its manifest) and the first missing function."""
    for variant in manifest["variants"]:
        name = variant["function"]
        if not module.implements_function(name, True):
            raise _fail(
                Path(path),
                f"the library lacks {name}, the manifest's {variant['op']} for hidden={variant['hidden']} "
                f"dtype={variant['dtype']} (library and manifest of different exports?)",
            )
