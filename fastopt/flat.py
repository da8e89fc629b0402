"""``FlatBuffer``: many parameters packed into one contiguous buffer per dtype.

Every parameter is a view into its group's ``data`` (and its gradient a view into ``grad``), so an
optimizer steps all of them with one fused kernel call per dtype. Segments start on
``ALIGN``-byte boundaries (vectorised loads stay possible); the padding between them holds zeros
in params, grads and state, which every optimizer maps to zero again.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._arrays import array_module, as_xp_array, check_one_device, on_device
from ._validate import check_str_names

__all__ = ["ALIGN", "FlatBuffer", "ReadOnlyViews"]

#: byte alignment of every segment (a cache line; at least the 16 bytes vector loads need)
ALIGN = 64


class ReadOnlyViews(Mapping[str, Any]):
    """A read-only mapping name -> array view: the views are live (write *into* them), the
    mapping cannot be rebound, since a new array under a name would silently not be the memory
    that is stepped."""

    __slots__ = ("_d", "_what")

    def __init__(self, d: dict[str, Any], what: str) -> None:
        self._d, self._what = d, what

    def __getitem__(self, name: str) -> Any:
        return self._d[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._d)

    def __len__(self) -> int:
        return len(self._d)

    def __contains__(self, name: object) -> bool:
        return name in self._d

    def __setitem__(self, name: str, value: Any) -> None:
        raise TypeError(
            f"{self._what} is read-only: its arrays are views into the memory that "
            f"is stepped; write into the view instead of rebinding it "
            f"({self._what}[{name!r}][...] = value)"
        )

    def __delitem__(self, name: str) -> None:
        raise TypeError(f"{self._what} is read-only: its names are fixed")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._d!r})"


@dataclass
class Group:
    """One dtype's flat buffers and where each parameter lives in them."""

    dtype: np.dtype[Any]
    #: the flat parameter buffer (NumPy or CuPy)
    data: Any
    #: the flat gradient buffer
    grad: Any
    #: name -> (offset, size, shape), in elements
    slots: dict[str, tuple[int, int, tuple[int, ...]]] = field(default_factory=dict)


class FlatBuffer:
    """Pack ``params`` (a dict name -> float array) into one flat buffer per dtype.

    The values are copied in; afterwards ``buf.params[name]`` and ``buf.grads[name]`` are views
    of the flat ``data`` / ``grad`` buffers, shaped like the originals. Write gradients into
    ``buf.grads`` (or ``buf.grad``) and call ``opt.step(buf)``. Host arrays give NumPy buffers,
    CuPy arrays (or any device arrays) give buffers on their GPU. Params may be float16,
    bfloat16, float32 or float64; ``grad_dtype="float32"`` keeps the grads of 16-bit groups in
    float32 (default: the params' dtype).
    """

    def __init__(
        self, params: Mapping[str, Any], *, align: int = ALIGN, grad_dtype: Any = None
    ) -> None:
        if not isinstance(params, Mapping) or not params:
            raise TypeError("FlatBuffer expects a non-empty dict name -> array")
        check_str_names(params, "FlatBuffer parameter names")
        if (
            isinstance(align, bool)
            or not isinstance(align, (int, np.integer))
            or align < 16
            or align & (align - 1)
        ):
            raise ValueError(f"align must be a power of two >= 16 bytes, got {align!r}")
        # arrays from any producer (PyTorch tensors, Numba device arrays...) as NumPy/CuPy views
        arrays = {n: as_xp_array(a, f"parameter {n!r}") for n, a in params.items()}
        check_one_device([(f"parameter {n!r}", a) for n, a in arrays.items()])
        first = next(iter(arrays.values()))
        xps = {array_module(a) for a in arrays.values()}
        if len(xps) > 1:
            raise ValueError(
                "FlatBuffer got host and device arrays together; put them on one device"
            )
        xp = xps.pop()
        self.xp = xp
        if grad_dtype is not None and np.dtype(grad_dtype) != np.float32:
            raise ValueError(
                f"grad_dtype={grad_dtype!r}; expected None (the params' dtype) or 'float32'"
            )
        order: dict[np.dtype[Any], list[str]] = {}
        for name, a in arrays.items():
            if not hasattr(a, "shape") or not hasattr(a, "dtype"):
                raise TypeError(f"parameter {name!r} is a {type(a).__name__}; expected an array")
            dt = np.dtype(a.dtype)
            if dt.kind != "f" and dt.name != "bfloat16":
                raise TypeError(f"parameter {name!r} has dtype {dt}; expected a floating dtype")
            # the buffers are native-endian whatever the input (the values are copied in)
            order.setdefault(dt.newbyteorder("="), []).append(name)
        self.groups: list[Group] = []
        params_: dict[str, Any] = {}
        grads_: dict[str, Any] = {}
        for dt, names in order.items():
            step = max(1, align // dt.itemsize)
            offset = 0
            slots: dict[str, tuple[int, int, tuple[int, ...]]] = {}
            for name in names:
                shape = tuple(arrays[name].shape)
                size = int(np.prod(shape, dtype=np.int64))
                slots[name] = (offset, size, shape)
                offset += -(-size // step) * step if size else 0
            # float32 grads for 16-bit params when asked (never narrower than the params')
            gdt = np.dtype(np.float32) if grad_dtype is not None and dt.itemsize == 2 else dt
            with on_device(first):  # the buffers live on the params' GPU, not the current one
                group = Group(dt, xp.zeros(offset, dt), xp.zeros(offset, gdt), slots)
            for name, (off, size, _shape) in slots.items():
                group.data[off : off + size] = xp.asarray(arrays[name], dtype=dt).reshape(-1)
            self.groups.append(group)
        for group in self.groups:
            for name, (off, size, shape) in group.slots.items():
                params_[name] = group.data[off : off + size].reshape(shape)
                grads_[name] = group.grad[off : off + size].reshape(shape)
        self.params = ReadOnlyViews({n: params_[n] for n in arrays}, "buf.params")
        self.grads = ReadOnlyViews({n: grads_[n] for n in arrays}, "buf.grads")

    def _single(self, attr: str) -> Any:
        if len(self.groups) != 1:
            raise ValueError(
                f"this FlatBuffer holds {len(self.groups)} dtypes "
                f"({', '.join(str(g.dtype) for g in self.groups)}); use buf.groups[i].{attr}"
            )
        return getattr(self.groups[0], attr)

    @property
    def data(self) -> Any:
        """The flat parameter buffer (one dtype only; else see ``groups``)."""
        return self._single("data")

    @property
    def grad(self) -> Any:
        """The flat gradient buffer (one dtype only; else see ``groups``)."""
        return self._single("grad")

    @property
    def names(self) -> list[str]:
        return list(self.params)

    @property
    def layout(self) -> tuple[tuple[Any, ...], ...]:
        """(dtype, name, offset, size, shape) of every parameter: what an optimizer binds to."""
        return tuple((str(g.dtype), n, *s) for g in self.groups for n, s in g.slots.items())

    def zero_grad(self) -> None:
        for g in self.groups:
            g.grad.fill(0)

    def __len__(self) -> int:
        return len(self.params)

    def __repr__(self) -> str:
        parts = ", ".join(
            f"{g.dtype}: {len(g.slots)} params / {g.data.size} elements" for g in self.groups
        )
        return f"FlatBuffer({parts})"
