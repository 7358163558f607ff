"""A test session's memo of dynamo traces: ``export_onnx`` traced once per distinct input, not once per test.

Each tiny export spends most of its time in ``torch.onnx.export`` (dynamo tracing, decompositions, translation),
and many tests export the same checkpoint with the same graph options to test what the export does after the
trace (precisions, validation, manifests, folders). For a given module (structure, weights, the methods it runs,
including the ones the export's attention rewrites put on its layers), opset and translation table, the trace is
the same every time, so within one run the second such call writes the file the first one wrote (under
pytest-xdist, in whichever worker: ``conftest.py`` gives the memos of one run a shared folder).

What the key holds, and why it errs towards tracing again: the module's repr (its structure), every parameter and
buffer (values, dtypes, shapes, names), each submodule's own attributes (numbers, strings, the model config as
JSON, and any function or method set on an instance, by code), and the code of every method of every class in
the module tree. A value of a kind it cannot describe makes the call uncacheable: traced, and not kept. What it
cannot see is a module-level function patched while a test runs; so a test that uses ``monkeypatch`` always
traces and keeps nothing (``conftest.py`` turns the memo off for it), and ``DEBERTA_ONNX_TRACE_CACHE=0`` turns it
off for a whole run. Exports run in subprocesses (the CLI tests, the fault tests) always trace.
"""

from __future__ import annotations

import enum
import hashlib
import os
import types
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV = "DEBERTA_ONNX_TRACE_CACHE"

# nn.Module's own bookkeeping: tensors and submodules are hashed on their own; hooks must be empty.
_MODULE_INTERNALS = {"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"}
_PRIMITIVES = (bool, int, float, str, bytes, type(None))


class Uncacheable(Exception):
    """A value the key cannot describe exactly: trace, and keep nothing."""


def _code(code: types.CodeType) -> bytes:
    parts = [code.co_name.encode(), code.co_code, repr(code.co_names).encode(), repr(code.co_varnames).encode()]
    for const in code.co_consts:
        parts.append(_code(const) if isinstance(const, types.CodeType) else repr(const).encode())
    return b"\0".join(parts)


def _function(fn: Any, visited: set[int] | None = None) -> bytes:
    """A function by its name and code, and what it closed over and defaults to (cycles cut by name)."""
    func = getattr(fn, "__func__", fn)  # a bound method's function
    code = getattr(func, "__code__", None)
    if code is None:
        raise Uncacheable(f"callable without Python code: {fn!r}")
    name = f"{func.__module__}.{func.__qualname__}".encode()
    visited = set() if visited is None else visited
    if id(func) in visited:
        return name
    visited.add(id(func))
    parts = [name, _code(code)]
    cells = [cell.cell_contents for cell in func.__closure__ or () if cell.cell_contents is not None]
    for value in [*(func.__defaults__ or ()), *(func.__kwdefaults__ or {}).values(), *cells]:
        if callable(value) and hasattr(getattr(value, "__func__", value), "__code__"):
            parts.append(_function(value, visited))
            continue
        try:
            parts.append(_value(value, set()))
        except Uncacheable:
            # What a decorator closed over (a context manager, a logger): the same object is the same key.
            parts.append(f"object:{type(value).__qualname__}@{id(value)}".encode())
    return b"\1".join(parts)


def _value(value: Any, seen: set[int]) -> bytes:
    import torch

    if isinstance(value, _PRIMITIVES):
        return f"{type(value).__name__}:{value!r}".encode()
    if isinstance(value, enum.Enum):  # e.g. transformers' kernels mode (a Flag): immutable, named by its value
        return f"enum:{type(value).__module__}.{type(value).__qualname__}:{value.value!r}".encode()
    if isinstance(value, (tuple, list, set, frozenset)):
        items = sorted(value, key=repr) if isinstance(value, (set, frozenset)) else value
        return f"{type(value).__name__}(".encode() + b",".join(_value(v, seen) for v in items) + b")"
    if isinstance(value, Mapping):
        return b"{" + b",".join(_value(k, seen) + b":" + _value(v, seen) for k, v in value.items()) + b"}"
    if isinstance(value, torch.Tensor):
        return _tensor(value)
    if isinstance(value, torch.nn.Module):
        if id(value) in seen:  # a module's reference to another in the tree (hashed where it sits)
            return f"module:{type(value).__qualname__}".encode()
        raise Uncacheable(f"module held as an attribute, outside the module tree: {type(value).__qualname__}")
    if isinstance(value, (torch.dtype, torch.device)):
        return repr(value).encode()
    if isinstance(value, types.BuiltinFunctionType):  # e.g. torch's gelu, held by transformers' activation
        return f"builtin:{value.__module__}.{value.__qualname__}".encode()
    if isinstance(value, type):  # e.g. the ``__class__`` cell of a method that calls ``super()``
        return f"class:{value.__module__}.{value.__qualname__}".encode()
    if callable(value) and hasattr(getattr(value, "__func__", value), "__code__"):
        return _function(value, seen)
    to_json = getattr(value, "to_json_string", None)  # transformers' PretrainedConfig
    if callable(to_json):
        return f"{type(value).__qualname__}:".encode() + to_json(use_diff=False).encode()
    raise Uncacheable(f"attribute of type {type(value).__qualname__}")


def _tensor(tensor: Any) -> bytes:
    import torch

    flat = tensor.detach().cpu().contiguous().reshape(-1)
    head = f"tensor:{flat.dtype}:{tuple(tensor.shape)}:".encode()
    return head + hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).digest()


def _classes(module: Any) -> bytes:
    parts = []
    for cls in type(module).__mro__:
        if cls.__module__.startswith("torch."):
            continue  # torch's own classes are fixed within a session, and nn.Module has hundreds of methods
        for name, attr in sorted(vars(cls).items()):
            func = attr.__func__ if isinstance(attr, (staticmethod, classmethod)) else attr
            if isinstance(func, types.FunctionType):
                parts.append(name.encode() + b"=" + _function(func))
    return b"\2".join(parts)


def trace_key(graph: Any, opset: int, translations: Mapping[Any, Any] | None) -> str:
    """The digest of everything ``export_onnx(graph, ..., opset=opset, translations=translations)`` traces;
    raises ``Uncacheable`` where it cannot tell."""
    digest = hashlib.sha256()
    digest.update(repr(graph).encode())
    digest.update(f"opset={opset}".encode())
    for op, translate in (translations or {}).items():
        digest.update(repr(op).encode() + _function(translate))
    modules = dict(graph.named_modules(remove_duplicate=False))
    seen = {id(m) for m in modules.values()}
    for name, module in modules.items():
        digest.update(f"module {name} {type(module).__module__}.{type(module).__qualname__}".encode())
        digest.update(_classes(module))
        for attr, value in sorted(vars(module).items()):
            if attr in _MODULE_INTERNALS:
                continue
            if "_hooks" in attr:  # _forward_hooks, _forward_pre_hooks_with_kwargs, ...
                if value and attr != "_forward_hooks_always_called":
                    raise Uncacheable(f"{name}.{attr} is not empty")
                continue
            digest.update(attr.encode() + b"=" + _value(value, seen))
        for tensor_name, tensor in [*module._parameters.items(), *module._buffers.items()]:
            digest.update(f"{tensor_name}:".encode() + (b"None" if tensor is None else _tensor(tensor)))
        digest.update(repr(sorted(module._non_persistent_buffers_set)).encode())
    return digest.hexdigest()


@dataclass
class Tally:
    """What a memo did in a session: traces made, reused and not keyable, and why not. Under pytest-xdist each
    worker has its own memo, and the controller adds their tallies up (``conftest.py``) before judging."""

    traced: int = 0
    reused: int = 0
    uncacheable: int = 0
    reasons: set[str] = field(default_factory=set)  # why calls were not cacheable: the values the key cannot describe
    active: bool = True

    def to_dict(self) -> dict[str, Any]:
        """Plain data, as a pytest-xdist worker sends it to the controller."""
        return {"traced": self.traced, "reused": self.reused, "uncacheable": self.uncacheable,
                "reasons": sorted(self.reasons), "active": self.active}

    def add(self, other: Mapping[str, Any]) -> None:
        """Adds a worker's tally (``to_dict``) to this one."""
        self.traced += other["traced"]
        self.reused += other["reused"]
        self.uncacheable += other["uncacheable"]
        self.reasons.update(other["reasons"])
        self.active = self.active and other["active"]

    def failure(self) -> str | None:
        """Why the memo failed the session, or ``None``: a value the key cannot describe (a new attribute that a
        library put on its modules turns the memo off for every export), or many traces and not one reused."""
        if self.reasons:
            return (f"{self.uncacheable} export(s) could not be keyed ({'; '.join(sorted(self.reasons))}): teach "
                    f"tests/trace_cache.py's _value to describe that value, or set {ENV}=0 to trace every export")
        if self.active and self.traced >= 10 and self.reused == 0:
            return f"{self.traced} exports traced and none reused: the memo's key changes from one export to the next"
        return None


class TraceCache:
    """Wraps ``export_onnx``: the first call with a key traces and keeps the file's bytes; later ones write them.

    ``store``: a folder that keeps the traces on disk as well, so that other processes with the same folder reuse
    them (the pytest-xdist workers of one run); a file appears there whole or not at all."""

    def __init__(self, export_onnx: Callable[..., Any], store: Path | None = None) -> None:
        self.export_onnx = export_onnx
        self._files: dict[str, bytes] = {}
        self._store = store
        self.tally = Tally(active=os.environ.get(ENV, "1") != "0")

    def _kept(self, key: str) -> bytes | None:
        if key not in self._files and self._store is not None and (self._store / f"{key}.onnx").exists():
            self._files[key] = (self._store / f"{key}.onnx").read_bytes()
        return self._files.get(key)

    def _keep(self, key: str, data: bytes) -> None:
        self._files[key] = data
        if self._store is not None:
            self._store.mkdir(parents=True, exist_ok=True)
            part = self._store / f"{key}.{os.getpid()}.part"
            part.write_bytes(data)
            os.replace(part, self._store / f"{key}.onnx")

    def __call__(self, graph: Any, path: Path, *, opset: int, translations: Mapping[Any, Any] | None = None) -> Any:
        import onnx

        key = None
        if self.tally.active:
            try:
                key = trace_key(graph, opset, translations)
            except Uncacheable as reason:
                self.tally.uncacheable += 1
                self.tally.reasons.add(str(reason))
        kept = None if key is None else self._kept(key)
        if kept is not None:
            self.tally.reused += 1
            Path(path).write_bytes(kept)
            return onnx.load(str(path), load_external_data=False)
        model = self.export_onnx(graph, path, opset=opset, translations=translations)
        self.tally.traced += 1
        if key is not None and not Path(path).with_name(Path(path).name + ".data").exists():
            self._keep(key, Path(path).read_bytes())
        return model

    @contextmanager
    def off(self) -> Iterator[None]:
        """Within the block, every call traces and nothing is kept."""
        active, self.tally.active = self.tally.active, False
        try:
            yield
        finally:
            self.tally.active = active
