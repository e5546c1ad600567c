"""A device that is not the host, emulated on the CPU for tests: tensors that compute on the CPU and say they live
on `DEVICE`.

The CPU tests run the engine with its device and the host the same, so a tensor the engine leaves on the host
where the device needs it (a table made with `torch.tensor` and no `device=`, then indexed by a device counter)
works there and fails only on a GPU. Inside `emulated_device()`, factories asked for `DEVICE`, `torch.tensor`
and `as_tensor` with it, and `.to(DEVICE)` make `OnDevice` tensors: CPU tensors underneath, `DEVICE` by their
`device`. An operation that mixes them with host tensors is refused as CUDA refuses it (a 0-dim host tensor
excepted: CUDA takes those as scalars); copies both ways, and host indices, are allowed. Inside
`recording_host_copies()` (which tests/tape.py opens around a recorded step), each crossing is listed: a copy
either way, a host index, a 0-dim host tensor read (a recorded CUDA graph cannot copy from pageable host
memory, nor read back; it keeps the value a host scalar had when it was recorded).

`DEVICE` is `meta` by name only (a CPU build of torch has no other device that is not the host, and refuses to
make tensors say `cuda`): no tensor here is a meta tensor, every one holds its values, including those the
engine makes on `meta` for shape checks while loading (real allocations, small at the tests' sizes). Triton
kernels run interpreted on the device's tensors, refusing a launch that hands them a host tensor, once a test
lets their launchers' input check take the device (`kernel_check`). What is CUDA's own (graphs' memory pools,
streams, pinned memory) is not emulated.
"""
from __future__ import annotations

import contextlib
import traceback

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

aten = torch.ops.aten
DEVICE = torch.device("meta")
# Operations CUDA lets mix a device tensor with host tensors of any size: copies, and indices on the host.
MIXING = {aten.copy_.default, aten._to_copy.default, aten._copy_from.default, aten._copy_from_and_resize.default,
          aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default}
_copies: list | None = None  # where `recording_host_copies` lists them


class OnDevice(torch.Tensor):
    """A CPU tensor (`elem`) that reports `DEVICE` as its device."""

    elem: torch.Tensor
    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, elem: torch.Tensor):
        out = torch.Tensor._make_wrapper_subclass(cls, elem.shape, strides=elem.stride(),
                                                  storage_offset=elem.storage_offset(), dtype=elem.dtype,
                                                  layout=elem.layout, device=DEVICE, requires_grad=elem.requires_grad)
        out.elem = elem
        return out

    def untyped_storage(self):  # the memory it computes in (tests/tape.py tells tensors apart by it)
        return self.elem.untyped_storage()

    def __repr__(self):
        return f"OnDevice({self.elem!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return _run(func, args, kwargs or {})


def _to_device(device) -> bool:
    return device is not None and torch.device(device) == DEVICE


def _crossed(what) -> None:
    if _copies is not None:
        _copies.append((what, traceback.extract_stack()))


def _run(func, args, kwargs):
    """`func` on the tensors underneath; its results on the device where an argument was or where it was asked
    to put them."""
    tensors = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)]
    on = any(isinstance(x, OnDevice) for x in tensors)
    host = [x for x in tensors if not isinstance(x, OnDevice)]
    asked = kwargs.get("device")
    if any(x.device == DEVICE for x in host):
        raise RuntimeError(f"{func}: torch made a tensor on {DEVICE} without its values (from data the emulation "
                           f"does not see: `_Moves` must turn it into a host tensor first)")
    if on and func not in MIXING and any(x.dim() > 0 for x in host):
        raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two devices, "
                           f"{DEVICE} (emulated) and cpu! ({func})")
    if func in MIXING and ((host and (on or _to_device(asked))) or (on and asked is not None and not
                                                                      _to_device(asked))):
        _crossed(func)
    elif on and host:  # 0-dim host tensors: CUDA passes their values with the launch, so a graph keeps them
        _crossed(func)
    unwrapped = {}

    def unwrap(x):
        if isinstance(x, OnDevice):
            unwrapped[id(x.elem)] = x
            return x.elem
        return x

    a, k = tree_map(unwrap, args), tree_map(unwrap, kwargs)
    if _to_device(asked):
        k["device"] = torch.device("cpu")
    k.pop("pin_memory", None)  # the device's memory is the host's: nothing to pin
    out = func(*a, **k)
    wrap = _to_device(asked) if asked is not None else on

    def rewrap(x):
        if not isinstance(x, torch.Tensor) or not wrap:
            return x
        same = unwrapped.get(id(x))  # an in-place result is its argument
        if same is None:
            return OnDevice(x)
        if (same.shape, same.stride(), same.storage_offset()) != (x.shape, x.stride(), x.storage_offset()):
            with torch._C._DisableTorchDispatch():  # `squeeze_` and the like: the argument's own view changed
                same.as_strided_(x.shape, x.stride(), x.storage_offset())
        return same

    return tree_map(rewrap, out)


class _Factories(TorchDispatchMode):
    """Operations asked to make their result on `DEVICE` (factories) go to `_run`."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _to_device(kwargs.get("device")):
            return _run(func, args, kwargs)
        return func(*args, **kwargs)


class _Moves(TorchFunctionMode):
    """`torch.tensor`, `torch.as_tensor` and `Tensor.to` to `DEVICE`, which torch answers before dispatch."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.as_tensor and isinstance(args[0], torch.Tensor):  # a tensor: moved as `to` moves it
            func, kwargs = torch.Tensor.to, {k: v for k, v in kwargs.items() if k in ("device", "dtype")}
        if func in (torch.tensor, torch.as_tensor) and _to_device(kwargs.get("device")):
            _crossed(func)  # values from the host
            return OnDevice(func(*args, **{**kwargs, "device": "cpu"}))
        if func is torch.Tensor.new_tensor and isinstance(args[0], OnDevice):
            _crossed(func)
            return OnDevice(torch.tensor(*args[1:], **{"dtype": args[0].dtype, **kwargs, "device": "cpu"}))
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and isinstance(args[0], OnDevice):
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(i, list) for i in index):  # torch would make it a tensor on the device, from the host
                _crossed(func)
                index = tuple(torch.tensor(i) if isinstance(i, list) else i for i in index)
                args = (args[0], index, *args[2:])
            return func(*args, **kwargs)
        if func is not torch.Tensor.to:
            return func(*args, **kwargs)
        x = args[0]
        device, dtype, _, memory_format = torch._C._nn._parse_to(*args[1:], **kwargs)
        if not _to_device(device):
            return func(*args, **kwargs)
        base = x.elem if isinstance(x, OnDevice) else x
        moved = base.to(dtype=dtype or base.dtype, memory_format=memory_format or torch.preserve_format)
        if isinstance(x, OnDevice):
            return x if moved is base else OnDevice(moved)
        _crossed(func)
        return OnDevice(moved.clone() if moved is base else moved)


def _launch(run):
    """Triton's interpreted launch, for kernels on the device: a host tensor among their arguments is refused (a
    GPU kernel cannot read host memory: Triton refuses it at launch), device tensors go as the memory they live in.
    """
    def launch(kernel, *args, grid, warmup, **kwargs):
        tensors = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, torch.Tensor)]
        if any(isinstance(x, OnDevice) for x in tensors) and not all(isinstance(x, OnDevice) for x in tensors):
            shapes = [(tuple(x.shape), str(x.device)) for x in tensors]
            raise ValueError(f"{kernel.fn.__name__}: a host tensor among a device kernel's arguments: {shapes}")
        unwrap = lambda x: x.elem if isinstance(x, OnDevice) else x  # noqa: E731
        return run(kernel, *tree_map(unwrap, args), grid=grid, warmup=warmup, **tree_map(unwrap, kwargs))
    return launch


def kernel_check(check):
    """A kernel launcher's input check (`kernels._common.check_inputs`) that takes the device as the host it
    computes on, so the interpreted kernels run there."""
    def on_host(name, q, k, v):
        if len({x.device for x in (q, k, v)}) > 1:
            raise ValueError(f"{name}: q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
        return check(name, *(x.elem if isinstance(x, OnDevice) else x for x in (q, k, v)))
    return on_host


@contextlib.contextmanager
def emulated_device(monkeypatch):
    """Inside, `DEVICE` is a device that is not the host, as described above; `torch.Generator(DEVICE)` draws
    the host's numbers."""
    host = torch.Generator

    class Generator(host):
        def __new__(cls, device="cpu"):
            return host.__new__(host, "cpu" if _to_device(device) else device)

    monkeypatch.setattr(torch, "Generator", Generator)
    from triton.runtime.interpreter import InterpretedFunction
    monkeypatch.setattr(InterpretedFunction, "run", _launch(InterpretedFunction.run))
    autocast = torch.is_autocast_enabled  # no autocast on the device (torch has none for `meta`)
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *a: not (a and _to_device(a[0])) and autocast(*a))
    with _Factories(), _Moves():
        yield


@contextlib.contextmanager
def recording_host_copies():
    """Lists the copies between host and device asked inside: yields the list of (operation, Python stack)."""
    global _copies
    before, _copies = _copies, []
    try:
        yield _copies
    finally:
        _copies = before
