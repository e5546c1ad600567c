"""A CUDA graph's semantics on the CPU, for tests: `capture_on_tape` stands in for `p2p_engine.graphs.capture`.

A CUDA graph records the kernels one call launches, with the addresses they read and write, and replays them
without running Python. What Python decided while recording (a branch on the step, a value read back with
`.item()`, a tensor made from a Python number) is baked into every replay. On the CPU, `Tape` records the
aten operations (and interpreted Triton launches) of one call the same way: each with its arguments as views
of the very storage it used, so a replay reads the buffers' current values and writes where the recording
wrote. As a CUDA graph's recording does, it leaves the state it found: writes to tensors made before it are
undone, and the tensors it made (the graph's own memory) are filled with NaN until a replay fills them. Like a
graph, it keeps its own tensors alive but not the ones it found: those it holds by a weak reference, and a
replay after one was freed fails (`_Borrowed`).

So an emulated replay equals the eager loop exactly where everything that changes between steps and edits
reaches the step as tensor data, which is what the CUDA tests check on a GPU. `Tape.syncs` lists what would
have read the device back to the host (a sync: refused while a CUDA graph records), and, on an emulated device
(tests/emulated_device.py), each crossing between host and device inside the recording.
"""
from __future__ import annotations

import traceback

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten, tree_map

import emulated_device
from emulated_device import OnDevice, recording_host_copies

aten = torch.ops.aten
EMULATION = {__file__, emulated_device.__file__}  # frames of the emulation, not of the code it runs
# Operations that read a tensor's values back to the host (a value, or a shape that depends on values), and
# `lift_fresh`: a tensor made from host data (`torch.tensor(...)`), which on a GPU is a copy from pageable host
# memory, refused while a graph records.
SYNCS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default, aten.equal.default,
         aten.is_nonzero.default, aten.unique_dim.default, aten._unique2.default, aten.lift_fresh.default}


def _pinned(x):
    """A view of the same storage, shape and strides that later operations cannot reshape (`squeeze_` and the
    like change a tensor's view in place; the recorded argument must stay the one the operation saw)."""
    return x.as_strided(x.size(), x.stride(), x.storage_offset()) if isinstance(x, torch.Tensor) else x


class _Borrowed:
    """A tensor made before the recording, as a graph holds it: by its address, not a reference (a graph does not
    keep its inputs alive), so a replay after its owner dropped it fails here; on a GPU it would read whatever the
    allocator put there since."""

    def __init__(self, x: torch.Tensor):
        self.ref = StorageWeakRef(x.untyped_storage())
        self.view = (x.dtype, x.size(), x.stride(), x.storage_offset(), isinstance(x, OnDevice))

    def get(self) -> torch.Tensor:
        if self.ref.expired():
            raise RuntimeError("a recorded step reads a tensor freed since its recording (a graph keeps addresses, "
                               "not tensors): keep it alive as long as the graph")
        dtype, size, stride, offset, on_device = self.view
        x = torch.empty(0, dtype=dtype).set_(torch.UntypedStorage._new_with_weak_ptr(self.ref.cdata), offset, size,
                                             stride)
        return OnDevice(x) if on_device else x


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


class Tape(TorchDispatchMode):
    """Records what runs inside `with tape:`; `finish()` then restores the state, `replay()` runs it again."""

    def __init__(self):
        super().__init__()
        self.ops = []  # (run, pinned outputs the replay refreshes)
        self.syncs = []  # (operation, the Python stack that asked for it)
        self.owned = set()  # the storages the recording allocated: the graph's own memory
        self.saved = []  # (a tensor made before the recording, its value before the recording first wrote it)
        self.inference = torch.is_inference_mode_enabled()

    def _before_write(self, tensors) -> None:
        for x in tensors:
            if x.untyped_storage().data_ptr() not in self.owned:
                self.saved.append((_pinned(x), x.clone()))

    def _hold(self, x):
        """An argument as the replay takes it: the recording's own tensors pinned, the others borrowed."""
        if not isinstance(x, torch.Tensor):
            return x
        return _pinned(x) if x.untyped_storage().data_ptr() in self.owned else _Borrowed(x)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNCS:
            self.syncs.append((func, traceback.extract_stack()))
        schema = func._schema
        given = list(zip(schema.arguments, args)) + [(a, kwargs[a.name]) for a in schema.arguments if a.name in kwargs]
        written = [x for a, value in given if a.alias_info is not None and a.alias_info.is_write
                   for x in _tensors(value)]  # a written Tensor[] (the _foreach_ ops) too
        self._before_write(written)
        storages = [x.untyped_storage().data_ptr() for x in written]
        held_args, held_kwargs = tree_map(self._hold, args), tree_map(self._hold, kwargs)
        out = func(*args, **kwargs)
        if storages != [x.untyped_storage().data_ptr() for x in written]:
            raise RuntimeError(f"{func} reallocated a tensor it writes; a recorded graph cannot")
        # New tensors (not views of an argument: `to` and `reshape` return either) are refreshed by a replay.
        # Each output keeps its place, None for a view, as a replay's outputs come in the same order.
        inputs = {x.untyped_storage().data_ptr() for x in _tensors((args, kwargs))}
        fresh = []
        for t in _tensors(out):
            ptr = t.untyped_storage().data_ptr()
            fresh.append(None if ptr in inputs else _pinned(t))
            if ptr not in inputs:
                self.owned.add(ptr)
        self.ops.append((lambda get, f=func, a=held_args, k=held_kwargs: f(*tree_map(get, a), **tree_map(get, k)),
                         fresh))
        return out

    def _triton_launch(self, launch, kernel, args, grid, kwargs):
        """An interpreted Triton launch: recorded whole (the kernel writes through raw pointers, so every tensor
        it is handed that the recording did not make is saved for `finish`)."""
        self._before_write(_tensors((args, kwargs)))
        held_args, held_kwargs = tree_map(self._hold, args), tree_map(self._hold, kwargs)
        with _disable_current_modes():  # the interpreter's own tensor copies are the launch's, not the step's
            out = launch(kernel, *args, grid=grid, warmup=False, **kwargs)
        self.ops.append((lambda get: launch(kernel, *tree_map(get, held_args), grid=grid, warmup=False,
                                            **tree_map(get, held_kwargs)), []))
        return out

    def __enter__(self):
        from triton.runtime.interpreter import InterpretedFunction
        launch = self._launch = InterpretedFunction.run
        tape = self

        def run(kernel, *args, grid, warmup, **kwargs):
            if warmup:
                return launch(kernel, *args, grid=grid, warmup=warmup, **kwargs)
            return tape._triton_launch(launch, kernel, args, grid, kwargs)

        InterpretedFunction.run = run
        return super().__enter__()

    def __exit__(self, *exc):
        from triton.runtime.interpreter import InterpretedFunction
        InterpretedFunction.run = self._launch
        return super().__exit__(*exc)

    def describe_syncs(self) -> str:
        """Each sync with the line that asked for it (the innermost frame outside torch and this file)."""
        lines = []
        for func, stack in self.syncs:
            asked = [f for f in stack if "site-packages" not in f.filename and f.filename not in EMULATION]
            where = f"{asked[-1].filename}:{asked[-1].lineno} ({asked[-1].line})" if asked else "?"
            lines.append(f"{func} at {where}")
        return "; ".join(lines)

    def finish(self) -> None:
        """Leave the state as a CUDA graph's recording does: the recording's writes to tensors made before it
        undone (latest first), the recording's own tensors NaN (floating point) until a replay fills them."""
        for x, value in reversed(self.saved):
            x.copy_(value)
        self.saved.clear()
        for _, fresh in self.ops:
            for t in fresh:
                if t is not None and t.is_floating_point():
                    t.fill_(float("nan"))

    def replay(self) -> None:
        live = {}  # each borrowed tensor, looked up once per replay

        def get(x):
            if not isinstance(x, _Borrowed):
                return x
            if id(x) not in live:
                live[id(x)] = x.get()
            return live[id(x)]

        with torch.inference_mode() if self.inference else torch.no_grad():
            for run, fresh in self.ops:
                out = run(get)
                for dst, src in zip(fresh, _tensors(out)):
                    if dst is not None:
                        dst.copy_(src)


def assert_recorded_cleanly(tapes: list) -> None:
    """At least one step was recorded, and no recorded step read the device back to the host or crossed to it."""
    assert tapes, "nothing was recorded"
    for tape in tapes:
        assert not tape.syncs, f"a recorded step read back to the host or crossed to it: {tape.describe_syncs()}"


def capture_on_tape(run, *, warmup: int, reset=None, tapes: list | None = None):
    """`p2p_engine.graphs.capture` on a tape: `warmup` calls, `reset()`, one call recorded; returns (replay, what
    the recorded call returned). Each tape is appended to `tapes`."""
    for _ in range(warmup):
        run()
    if reset is not None:
        reset()
    tape = Tape()
    with tape, recording_host_copies() as copies:
        out = run()
    tape.syncs += copies  # on an emulated device (tests/emulated_device.py): a copy from the host syncs
    tape.finish()
    if tapes is not None:
        tapes.append(tape)
    return tape.replay, out
