"""Checkpoints: parameters and optimizer in one file, written atomically, verified on load.

File layout (all integers little-endian)::

    magic      8 bytes   b"FOPTCKPT"
    version    u32       FORMAT_VERSION
    header_len u64       bytes of the JSON header
    payload_len u64      bytes of the array payload
    sha256     32 bytes  over everything else in the file (magic .. payload, this field excluded)
    header     JSON      optimizer kind, step, hyperparameters, and per array: role (param or
                         state), parameter name, state name, dtype ("<f2"/"<f4"/"<f8" or
                         "bfloat16": its 16 bits, little-endian), shape, offset, nbytes
    payload    the arrays' raw bytes, C order, one after the other

No pickle anywhere: the header is JSON, the arrays are raw little-endian floats, so loading a
file from anywhere runs no code. ``save_checkpoint`` resolves a symbolic link to the file it
points to and refuses a path that exists but is not a regular file (a directory, a FIFO, a
device); it writes a temporary file in that file's directory, flushes and fsyncs it, gives it
the permission mode of the file it replaces (a new file gets the mode the umask allows),
renames it over the target (``os.replace``, atomic on POSIX and Windows) and fsyncs the
directory: a crash or an error leaves either the old file or the new one, never a mix. A
temporary file left by a save that was killed (``.<name>.fastopt-tmp.<host>.<pid>.<token>``,
its process gone) is removed by the next save to the same target. ``load_checkpoint`` reads
and verifies the whole file (magic, version, size, checksum, header, then names, shapes and
dtypes against the given parameters and optimizer) before it writes a single byte.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import secrets
import socket
import stat
import struct
from typing import Any

import numpy as np

from . import precision
from ._arrays import array_module, as_xp_array, to_numpy
from ._validate import SUPPORTED_DTYPES, check_array, check_names, describe, dtype_of
from .base import Optimizer
from .flat import FlatBuffer

__all__ = ["FORMAT_VERSION", "MAGIC", "CheckpointError", "load_checkpoint", "save_checkpoint"]

MAGIC = b"FOPTCKPT"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sIQQ")  # magic, version, header_len, payload_len
_DIGEST = 32
_HEAD = _PREFIX.size + _DIGEST
_DTYPES = {
    np.dtype(d).newbyteorder("<").str: np.dtype(d).newbyteorder("<")
    for d in SUPPORTED_DTYPES
    if d != "bfloat16"
}
_DTYPES["bfloat16"] = "bfloat16"  # ml_dtypes' dtype, resolved when a file holds one


def _file_dtype(name):
    """The NumPy dtype of a header's dtype entry (bfloat16 needs ml_dtypes)."""
    if name == "bfloat16":
        try:
            return precision.bfloat16()
        except ImportError as exc:
            raise CheckpointError(f"the checkpoint holds bfloat16 arrays: {exc}") from None
    return _DTYPES[name]


def _le_bytes(a):
    """``(header dtype, little-endian bytes)`` of a host array."""
    if precision.kind(a.dtype) == "bfloat16":
        return "bfloat16", np.ascontiguousarray(a).view(np.uint16).astype("<u2").tobytes()
    # reshaped back: ascontiguousarray makes a 0-d array (a host-state scalar) 1-d
    a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).reshape(a.shape)
    return a.dtype.str, a.tobytes()


class CheckpointError(ValueError):
    """A checkpoint file that is truncated, corrupted, foreign or of an unknown version."""


def _named_params(params):
    if isinstance(params, FlatBuffer):
        return dict(params.params)
    if not isinstance(params, dict):
        raise TypeError(
            f"params must be a dict name -> array or a fastopt.FlatBuffer, got "
            f"{type(params).__name__}"
        )
    out = {}
    for name, a in params.items():
        if not isinstance(name, str):
            raise TypeError(f"parameter names must be strings, got {name!r}")
        a = as_xp_array(a)
        check_array(name, "param", a, SUPPORTED_DTYPES)
        out[name] = a
    return out


def save_checkpoint(path: str | os.PathLike, optimizer: Optimizer, params: Any) -> None:
    """Write ``params`` (dict name -> array, or a ``FlatBuffer``) and ``optimizer`` (kind,
    hyperparameters, flags, step, every state buffer) to ``path``, atomically.

    Device arrays are copied to the host for writing. On any error the previous file at
    ``path`` is left as it was and no temporary file remains.
    """
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer must be a fastopt optimizer, got {type(optimizer).__name__}")
    named = _named_params(params)
    sd = optimizer.state_dict()
    optimizer._check_hyper(dict(sd["hyperparams"]))  # a file that could never be loaded: refuse
    if sd["state"]:
        check_names(
            sd["state"],
            named,
            "the optimizer's parameter names",
            "the names of the params being saved",
        )
    arrays = [("param", n, None, to_numpy(a)) for n, a in named.items()]
    arrays += [("state", n, s, a) for n, st in sd["state"].items() for s, a in st.items()]
    entries, blobs, offset = [], [], 0
    for role, name, slot, a in arrays:
        dtype, blob = _le_bytes(a)
        entries.append(
            {
                "role": role,
                "name": name,
                "slot": slot,
                "dtype": dtype,
                "shape": list(a.shape),
                "offset": offset,
                "nbytes": len(blob),
            }
        )
        blobs.append(blob)
        offset += len(blob)
    header = json.dumps(
        {
            "format": "fastopt-checkpoint",
            "optimizer": sd["optimizer"],
            "step": sd["step"],
            "hyperparams": sd["hyperparams"],
            "arrays": entries,
        },
        allow_nan=False,
        sort_keys=True,
    ).encode()
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(header), offset)
    h = hashlib.sha256(prefix)
    h.update(header)
    for blob in blobs:
        h.update(blob)
    _atomic_write(os.fspath(path), [prefix, h.digest(), header, *blobs])


_TMP = ".fastopt-tmp."


def _kind(mode):
    for test, what in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return what
    return "not a regular file"


def _target(path):
    """The regular file a save replaces (a symbolic link's final target) and its ``stat``, or
    None when it does not exist yet; anything else is refused before a byte is written."""
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
    except FileNotFoundError:
        return real, None
    if not stat.S_ISREG(st.st_mode):
        shown = path if real == os.path.abspath(path) else f"{path} (-> {real})"
        raise ValueError(
            f"checkpoint path {shown!r} is {_kind(st.st_mode)}; a checkpoint "
            "replaces a regular file, nothing else (pass the path of a file)"
        )
    return real, st


def _host():
    return socket.gethostname().replace(os.sep, "_") or "localhost"


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: it exists, under another user
        return True
    return True


def _remove_stale_temps(directory, base):
    """Remove this target's temporary files whose saving process no longer runs here."""
    if os.name != "posix":
        return  # os.kill(pid, 0) would not be a harmless probe
    prefix, host = "." + base + _TMP, _host()
    with contextlib.suppress(OSError):
        for name in os.listdir(directory):
            if not name.startswith(prefix):
                continue
            parts = name[len(prefix) :].rsplit(".", 2)  # host, pid, token
            if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
                continue
            pid = int(parts[1])
            if pid != os.getpid() and not _alive(pid):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(directory, name))


def _atomic_write(path, chunks):
    target, old = _target(path)
    directory, base = os.path.split(target)
    _remove_stale_temps(directory, base)
    tmp = os.path.join(directory, f".{base}{_TMP}{_host()}.{os.getpid()}.{secrets.token_hex(4)}")
    flags = (
        os.O_WRONLY
        | os.O_CREAT
        | os.O_EXCL
        | getattr(os, "O_BINARY", 0)
        | getattr(os, "O_CLOEXEC", 0)
    )
    # a new file gets 0o666 less the umask, as open() would give it; a replaced file keeps its
    # mode (set below, once the file is private to this process)
    fd = os.open(tmp, flags, 0o666 if old is None else 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            if old is not None and hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), stat.S_IMODE(old.st_mode))
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def _fsync_dir(directory):
    """Make the rename itself durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read(path):
    """The verified header and the arrays of a checkpoint file (host, read-only views)."""
    where_ = f"checkpoint {os.fspath(path)!r}"
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):  # a FIFO or a device could block or never end
        raise CheckpointError(f"{where_} is {_kind(mode)}, not a checkpoint file")
    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < _HEAD:
        if not MAGIC.startswith(blob[: len(MAGIC)]):
            raise CheckpointError(f"{where_} is not a fastopt checkpoint (bad magic bytes)")
        raise CheckpointError(
            f"{where_} is truncated: {len(blob)} bytes, shorter than the {_HEAD}-byte prefix"
        )
    magic, version, header_len, payload_len = _PREFIX.unpack_from(blob)
    if magic != MAGIC:
        raise CheckpointError(
            f"{where_} is not a fastopt checkpoint (magic {magic!r}, expected {MAGIC!r})"
        )
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{where_} has format version {version}; this fastopt reads version {FORMAT_VERSION}"
        )
    expected = _HEAD + header_len + payload_len
    if len(blob) != expected:
        raise CheckpointError(
            f"{where_} is {len(blob)} bytes but its prefix says {expected} "
            f"({'truncated' if len(blob) < expected else 'trailing data'})"
        )
    h = hashlib.sha256(blob[: _PREFIX.size])
    h.update(memoryview(blob)[_HEAD:])
    if h.digest() != blob[_PREFIX.size : _HEAD]:
        raise CheckpointError(f"{where_} is corrupted: sha256 checksum mismatch")
    try:
        header = json.loads(blob[_HEAD : _HEAD + header_len].decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{where_} has an unreadable header: {exc}") from None
    payload = memoryview(blob)[_HEAD + header_len :]
    return header, _arrays(header, payload, where_)


def _arrays(header, payload, where_):
    def bad(msg):
        return CheckpointError(f"{where_} has a malformed header: {msg}")

    if not isinstance(header, dict) or header.get("format") != "fastopt-checkpoint":
        raise bad("not a fastopt checkpoint header")
    for key in ("optimizer", "step", "hyperparams", "arrays"):
        if key not in header:
            raise bad(f"missing {key!r}")
    params, state, end = {}, {}, 0
    for e in header["arrays"]:
        if (
            not isinstance(e, dict)
            or e.get("dtype") not in _DTYPES
            or e.get("role") not in ("param", "state")
            or not isinstance(e.get("name"), str)
        ):
            raise bad(f"bad array entry {e!r}")
        dt, shape = _file_dtype(e["dtype"]), e.get("shape")
        if not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
            raise bad(f"bad shape in {e!r}")
        nbytes = math.prod(shape) * dt.itemsize
        if e.get("offset") != end or e.get("nbytes") != nbytes or end + nbytes > len(payload):
            raise bad(f"array {e['name']!r} does not fit the payload")
        if e["dtype"] == "bfloat16":
            a = np.frombuffer(payload, "<u2", math.prod(shape), end).astype(np.uint16).view(dt)
            a = a.reshape(shape)
        else:
            a = np.frombuffer(payload, dt, math.prod(shape), end).reshape(shape)
            a = a.astype(dt.newbyteorder("="), copy=False)
        end += nbytes
        if e["role"] == "param":
            if e["name"] in params:
                raise bad(f"parameter {e['name']!r} twice")
            params[e["name"]] = a
        else:
            if not isinstance(e.get("slot"), str) or e["slot"] in state.get(e["name"], {}):
                raise bad(f"bad or repeated state entry {e!r}")
            state.setdefault(e["name"], {})[e["slot"]] = a
    if end != len(payload):
        raise bad("payload holds bytes no array claims")
    return params, state


def load_checkpoint(path: str | os.PathLike, optimizer: Optimizer, params: Any) -> None:
    """Restore a ``save_checkpoint`` file in place into ``params`` (dict name -> array, or a
    ``FlatBuffer``) and ``optimizer``.

    Verifies everything before writing anything: magic, version, size, checksum and header of
    the file; then that the parameter names, shapes and dtypes are those of ``params`` and that
    the optimizer kind, flags, hyperparameters and state fit ``optimizer``. A refused file
    raises ``CheckpointError`` (a ``ValueError``), or ``KeyError``/``ValueError``/``TypeError``
    for a mismatch, and changes nothing. Device arrays are restored on their device.
    """
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer must be a fastopt optimizer, got {type(optimizer).__name__}")
    named = _named_params(params)
    header, (saved, state) = _read(path)
    check_names(
        saved, named, "the checkpoint's parameter names", "the names of the params being restored"
    )
    for name, a in saved.items():
        p = named[name]
        if tuple(p.shape) != a.shape or dtype_of(p) != a.dtype:
            raise ValueError(
                f"checkpoint parameter {name!r} is {a.dtype}{list(a.shape)} but "
                f"the param is {describe(p)}; expected the same shape and dtype"
            )
        if isinstance(p, np.ndarray) and not p.flags.writeable:
            raise ValueError(f"param {name!r} ({describe(p)}) is read-only; cannot restore into it")
    if state:
        check_names(
            state,
            named,
            "the checkpoint's optimizer state names",
            "the names of the params being restored",
        )
    sd = {
        "optimizer": header["optimizer"],
        "step": header["step"],
        "hyperparams": header["hyperparams"],
        "state": state,
    }
    with optimizer._exclusive_use("load_checkpoint"):
        plan = optimizer._check_state_dict(sd)  # kind, flags, values, names, shapes, dtypes
        # everything is verified: from here on nothing can be refused
        for name, a in saved.items():
            p = named[name]
            p[...] = array_module(p).asarray(a) if not isinstance(p, np.ndarray) else a
        optimizer._commit_state_dict(*plan)
