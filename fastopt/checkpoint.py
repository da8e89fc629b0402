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
its process gone) is removed by the next save to the same target.

``load_checkpoint`` verifies everything before it writes a single byte, and bounds every read
before it happens (``_read``): the 52-byte prefix first, its lengths held to the opened file's
size and the header to ``MAX_HEADER`` bytes; the header parsed only when it nests at most
``MAX_DEPTH`` deep (a scan outside its strings, so ``json`` never recurses deeper); its array
entries held to tile the payload exactly; then, before the payload is read, the optimizer kind,
flags and hyperparameters, every parameter's name, shape and dtype, and every state array's
name, shape and dtype against what the optimizer keeps for that parameter (``_check_fits``), so
that a file allocates no more than the targets hold; then each array into its own buffer, the
checksum, and the state's values (``Optimizer._check_state_dict``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import secrets
import socket
import stat
import struct
from typing import Any

import numpy as np

from . import precision
from ._arrays import array_module, as_xp_array, to_numpy
from ._validate import (
    SUPPORTED_DTYPES,
    check_array,
    check_names,
    describe,
    dtype_name,
    dtype_of,
    normalise_hyper,
)
from .base import Optimizer
from .flat import FlatBuffer

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_DEPTH",
    "MAX_HEADER",
    "CheckpointError",
    "load_checkpoint",
    "save_checkpoint",
]

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
_DTYPES["|u1"] = np.dtype(np.uint8)  # quantized state's codes (kernels/quant.py)
_DTYPES["<i2"] = np.dtype("<i2")  # a master kept as a remainder ("master_remainder")


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


#: the largest header a reader accepts: about 400,000 array entries (a model's parameters and
#: every state buffer), far beyond any checkpoint, far below what exhausts memory
MAX_HEADER = 64 << 20
#: the deepest nesting a header may have; a valid one nests 4 deep (the arrays' shapes)
MAX_DEPTH = 8
#: the most dimensions an array entry may have (NumPy's own limit is 64)
MAX_NDIM = 32
_CHUNK = 1 << 20
#: a JSON string (its brackets do not nest): possessive, so a scan never backtracks
_JSON_STRING = re.compile(r'"(?:[^"\\]++|\\.)*+"', re.S)


def _depth(text):
    """The deepest ``[``/``{`` nesting of a JSON text, outside its strings: an upper bound of
    what ``json.loads`` would recurse into (without recursing)."""
    skel = np.frombuffer(_JSON_STRING.sub('""', text).encode(), np.uint8)
    steps = np.isin(skel, (ord("["), ord("{"))).astype(np.int64)
    steps -= np.isin(skel, (ord("]"), ord("}")))
    return int(np.cumsum(steps).max(initial=0))


def _refuse_constant(name):
    raise ValueError(f"{name} is not a number a checkpoint holds")


def _read_exact(f, buf, where_, what):
    """Fill ``buf`` (a writable buffer) from ``f``; a file that ends first is truncated."""
    view, got = memoryview(buf).cast("B"), 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise CheckpointError(f"{where_} is truncated: it ended while reading {what}")
        got += n
    return buf


def _open(path, where_):
    """The checkpoint file opened for reading, and its size: a regular file only (a FIFO or a
    device could block or never end), checked again on the opened descriptor."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{where_} is {_kind(mode)}, not a checkpoint file")
    flags = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags | getattr(os, "O_NONBLOCK", 0))  # never waits for a writer
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # replaced since the stat above
            raise CheckpointError(f"{where_} is {_kind(st.st_mode)}, not a checkpoint file")
        return os.fdopen(fd, "rb", buffering=0), st.st_size
    except BaseException:
        os.close(fd)
        raise


def _intact(f, h, digest, left):
    """Does the rest of the file (``left`` bytes) complete ``h`` to ``digest``? Read in chunks:
    memory stays small whatever the size."""
    h = h.copy()
    buf = bytearray(min(_CHUNK, max(left, 1)))
    while left > 0:
        n = f.readinto(memoryview(buf)[: min(left, len(buf))])
        if not n:
            return False
        h.update(memoryview(buf)[:n])
        left -= n
    return h.digest() == digest


def _read(path, expect=None, budget=None):
    """The verified header and the arrays of a checkpoint file (host arrays).

    Every read is bounded before it happens: the prefix is read first and its lengths are held
    to the file's size (``fstat`` of the opened file) and the header to ``MAX_HEADER``; the
    header is parsed only when its nesting is at most ``MAX_DEPTH``; its array entries are
    checked to tile the payload exactly; ``expect(header, entries)`` (the caller's check of
    names, shapes and dtypes against its targets) runs before the payload is read, so a file
    allocates no more than its targets hold; then each array is read into its own buffer and
    the checksum is verified before anything is returned. A header that cannot be parsed or a
    refusal by ``expect`` is reported as corruption when the checksum does not match, verified
    in bounded chunks when the payload is at most ``budget`` bytes (what the targets could hold:
    a larger file is not theirs either way, and is refused without reading it).
    """
    where_ = f"checkpoint {os.fspath(path)!r}"
    f, size = _open(path, where_)
    with f:
        if size < _HEAD:
            blob = _read_exact(f, bytearray(size), where_, "the prefix")
            if not MAGIC.startswith(bytes(blob[: len(MAGIC)])):
                raise CheckpointError(f"{where_} is not a fastopt checkpoint (bad magic bytes)")
            raise CheckpointError(
                f"{where_} is truncated: {size} bytes, shorter than the {_HEAD}-byte prefix"
            )
        head = bytes(_read_exact(f, bytearray(_HEAD), where_, "the prefix"))
        magic, version, header_len, payload_len = _PREFIX.unpack_from(head)
        if magic != MAGIC:
            raise CheckpointError(
                f"{where_} is not a fastopt checkpoint (magic {magic!r}, expected {MAGIC!r})"
            )
        if version != FORMAT_VERSION:
            raise CheckpointError(
                f"{where_} has format version {version}; this fastopt reads version "
                f"{FORMAT_VERSION}"
            )
        expected = _HEAD + header_len + payload_len
        if size != expected:
            raise CheckpointError(
                f"{where_} is {size} bytes but its prefix says {expected} "
                f"({'truncated' if size < expected else 'trailing data'})"
            )
        if header_len > MAX_HEADER:
            raise CheckpointError(
                f"{where_} declares a {header_len}-byte header; a checkpoint header is at most "
                f"{MAX_HEADER} bytes"
            )
        digest = head[_PREFIX.size :]
        raw = bytes(_read_exact(f, bytearray(header_len), where_, "the header"))
        h = hashlib.sha256(head[: _PREFIX.size])
        h.update(raw)

        # on a refusal: is the file damaged? (a payload beyond the budget is not read to tell)
        def intact():
            return (budget is not None and payload_len > budget) or _intact(
                f, h, digest, payload_len
            )

        header = _parse_header(raw, where_, intact)
        entries = _entries(header, payload_len, where_)
        if expect is not None:
            try:
                expect(header, entries)
            except (KeyError, TypeError, ValueError):
                if not intact():
                    raise CheckpointError(
                        f"{where_} is corrupted: sha256 checksum mismatch"
                    ) from None
                raise
        params: dict[str, Any] = {}
        state: dict[str, Any] = {}
        for e in entries:
            a = _read_exact(f, np.empty(e.count, e.file_dtype), where_, f"array {e.name!r}")
            h.update(memoryview(a).cast("B"))
            if e.dtype == "bfloat16":
                a = a.astype(np.uint16).view(_file_dtype("bfloat16"))
            else:
                a = a.astype(a.dtype.newbyteorder("="), copy=False)
            a = a.reshape(e.shape)
            if e.role == "param":
                params[e.name] = a
            else:
                state.setdefault(e.name, {})[e.slot] = a
        if h.digest() != digest:
            raise CheckpointError(f"{where_} is corrupted: sha256 checksum mismatch")
    return header, (params, state)


def _parse_header(raw, where_, intact):
    """The header's JSON, parsed with bounded depth (a corrupted file says so: ``intact``)."""
    try:
        text = raw.decode()
        depth = _depth(text)
        if depth > MAX_DEPTH:
            raise ValueError(f"nested {depth} deep (a checkpoint header nests at most {MAX_DEPTH})")
        return json.loads(text, parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        if not intact():
            raise CheckpointError(f"{where_} is corrupted: sha256 checksum mismatch") from None
        raise CheckpointError(f"{where_} has an unreadable header: {exc}") from None


class _Entry:
    """One array of a checkpoint, as its header declares it."""

    __slots__ = ("count", "dtype", "file_dtype", "name", "role", "shape", "slot")

    def __init__(self, role, name, slot, dtype, shape):
        self.role, self.name, self.slot, self.dtype, self.shape = role, name, slot, dtype, shape
        self.count = math.prod(shape)
        self.file_dtype = np.dtype("<u2") if dtype == "bfloat16" else _DTYPES[dtype]

    def resolved_dtype(self):
        """The array's NumPy dtype in native byte order (bfloat16 through ml_dtypes)."""
        return (
            _file_dtype(self.dtype)
            if self.dtype == "bfloat16"
            else self.file_dtype.newbyteorder("=")
        )


def _entries(header, payload_len, where_):
    """The header's array entries, checked to tile the payload exactly, in order."""

    def bad(msg):
        return CheckpointError(f"{where_} has a malformed header: {msg}")

    if not isinstance(header, dict) or header.get("format") != "fastopt-checkpoint":
        raise bad("not a fastopt checkpoint header")
    for key in ("optimizer", "step", "hyperparams", "arrays"):
        if key not in header:
            raise bad(f"missing {key!r}")
    if not isinstance(header["arrays"], list):
        raise bad("'arrays' is not a list")
    out, seen, end = [], set(), 0
    for e in header["arrays"]:
        if (
            not isinstance(e, dict)
            or e.get("dtype") not in _DTYPES
            or e.get("role") not in ("param", "state")
            or not isinstance(e.get("name"), str)
        ):
            raise bad(f"bad array entry {_short(e)}")
        shape = e.get("shape")
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_NDIM
            or not all(type(n) is int and n >= 0 for n in shape)
        ):
            raise bad(f"bad shape in {_short(e)}")
        slot = e.get("slot")
        if e["role"] == "state" and not isinstance(slot, str):
            raise bad(f"bad state entry {_short(e)}")
        entry_key = (e["role"], e["name"], slot if e["role"] == "state" else None)
        if entry_key in seen:
            raise bad(f"{e['role']} {e['name']!r}{'' if slot is None else f' {slot!r}'} twice")
        seen.add(entry_key)
        entry = _Entry(e["role"], e["name"], entry_key[2], e["dtype"], tuple(shape))
        nbytes = entry.count * entry.file_dtype.itemsize
        if e.get("offset") != end or e.get("nbytes") != nbytes or end + nbytes > payload_len:
            raise bad(f"array {e['name']!r} does not fit the payload")
        end += nbytes
        out.append(entry)
    if end != payload_len:
        raise bad("payload holds bytes no array claims")
    return out


def _short(obj, limit=200):
    text = repr(obj)
    return text if len(text) <= limit else text[:limit] + "..."


def _check_fits(header, entries, optimizer, named):
    """Everything the header says against the targets, before the payload is read: optimizer
    kind, hyperparameters and flags; each parameter's name, shape and dtype (and that it can be
    written); each state array's name, shape and dtype against what ``optimizer`` keeps for that
    parameter (its state dtype policy, a master copy), and against the parameters it already
    steps. A file that fits nothing it is loaded into is refused here, whatever its size."""
    kind = type(optimizer).__name__
    if header["optimizer"] != kind:
        raise ValueError(f"the checkpoint is for optimizer {header['optimizer']!r}, this is {kind}")
    hp = header["hyperparams"]
    if not isinstance(hp, dict):
        raise TypeError(f"checkpoint hyperparams is a {type(hp).__name__}; expected a dict")
    check_names(
        hp, optimizer._hyper + optimizer._flags, "checkpoint hyperparameters", f"those of {kind}"
    )
    hp = {k: normalise_hyper(v) for k, v in hp.items()}
    for f in optimizer._flags:
        if hp[f] != getattr(optimizer, f):
            raise ValueError(
                f"the checkpoint has {f}={hp[f]!r} but this optimizer has "
                f"{f}={getattr(optimizer, f)!r}; flags decide the state buffers and the math, "
                "so they must match"
            )
    optimizer._check_hyper(hp)
    saved = {e.name: e for e in entries if e.role == "param"}
    check_names(
        saved, named, "the checkpoint's parameter names", "the names of the params being restored"
    )
    bound = optimizer._bound or {}
    for name, e in saved.items():
        p, dt = named[name], e.resolved_dtype()
        if tuple(p.shape) != e.shape or dtype_of(p) != dt:
            raise ValueError(
                f"checkpoint parameter {name!r} is {dtype_name(dt)}{list(e.shape)} but the "
                f"param is {describe(p)}; expected the same shape and dtype"
            )
        if isinstance(p, np.ndarray) and not p.flags.writeable:
            raise ValueError(f"param {name!r} ({describe(p)}) is read-only; cannot restore into it")
        if name in bound and bound[name] != (e.shape, dt):
            shape, was = bound[name]
            raise ValueError(
                f"checkpoint parameter {name!r} is {dtype_name(dt)}{list(e.shape)} but this "
                f"optimizer was first stepped with {dtype_name(was)}{list(shape)}; load into "
                "a new optimizer or into the parameters it steps"
            )
    state: dict[str, Any] = {}
    for e in entries:
        if e.role == "state":
            state.setdefault(e.name, {})[e.slot] = e
    if not state:
        return
    check_names(
        state,
        named,
        "the checkpoint's optimizer state names",
        "the names of the params being restored",
    )
    host = optimizer._spec.host_names
    for name, slots in state.items():
        pshape, pdt = saved[name].shape, saved[name].resolved_dtype()
        pk = precision.kind(pdt)
        want = optimizer._names_for(pk)
        check_names(
            slots,
            want + host,
            f"checkpoint state buffers of parameter {name!r}",
            f"those {kind} keeps for a {pk} parameter",
        )
        specs = optimizer._kinds().buffers_for(pk, pshape)
        for s, e in slots.items():
            dt = e.resolved_dtype()
            need = ((), None) if s in host else specs[s]
            if e.shape != need[0] or (need[1] is not None and dt != need[1]):
                shown = "a 0-d array" if s in host else f"{dtype_name(need[1])}{list(need[0])}"
                raise ValueError(
                    f"checkpoint state {s!r} of parameter {name!r} is "
                    f"{dtype_name(dt)}{list(e.shape)}, but the parameter is "
                    f"{dtype_name(pdt)}{list(pshape)}: {kind} keeps it as {shown}"
                )


def _budget(optimizer, named):
    """The most payload bytes a checkpoint of ``named`` could hold for an optimizer of this
    kind in any of its configurations: each parameter, every state buffer its rule declares and
    a master copy at 8 bytes an element, and the host state."""
    spec = optimizer._spec
    per_element = 8 * (len(spec.slots) + 1)
    return sum(
        int(p.size) * (dtype_of(p).itemsize + per_element) + 8 * len(spec.host_names)
        for p in named.values()
    )


def load_checkpoint(path: str | os.PathLike, optimizer: Optimizer, params: Any) -> None:
    """Restore a ``save_checkpoint`` file in place into ``params`` (dict name -> array, or a
    ``FlatBuffer``) and ``optimizer``.

    Verifies everything before writing anything: the file's magic, version and size, its
    header's size and nesting (every read bounded by the file's size and the header's declared
    sizes, checked before it happens); then, before the payload is read, that the optimizer
    kind, flags and hyperparameters fit ``optimizer``, that the parameter names, shapes and
    dtypes are those of ``params``, and that every state array has the shape and dtype
    ``optimizer`` keeps for its parameter; then the checksum, and the state's values. A refused
    file raises ``CheckpointError`` (a ``ValueError``), or ``KeyError``/``ValueError``/
    ``TypeError`` for a mismatch, and changes nothing. Device arrays are restored on their
    device.
    """
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer must be a fastopt optimizer, got {type(optimizer).__name__}")
    named = _named_params(params)
    with optimizer._exclusive_use("load_checkpoint"):
        header, (saved, state) = _read(
            path,
            lambda header, entries: _check_fits(header, entries, optimizer, named),
            _budget(optimizer, named),
        )
        sd = {
            "optimizer": header["optimizer"],
            "step": header["step"],
            "hyperparams": header["hyperparams"],
            "state": state,
        }
        plan = optimizer._check_state_dict(sd)  # kind, flags, values, names, shapes, dtypes
        # everything is verified: from here on nothing can be refused
        for name, a in saved.items():
            p = named[name]
            p[...] = array_module(p).asarray(a) if not isinstance(p, np.ndarray) else a
        optimizer._commit_state_dict(*plan)
