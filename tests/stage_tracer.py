"""`python tests/stage_tracer.py ARGS` runs `python -m carso ARGS` and writes to the file $CARSO_TRACE what the
stage really used: every carso module it imported (sys.modules at exit: by an import statement or by importlib,
as the registry's by-name functions are), every file it opened for reading (Python's `open` audit events, and
safetensors' own readers, which open files outside Python), and every params.yaml key whose value it read after
the validation (the validation reads every key; it is not a dependency)."""
from __future__ import annotations

import atexit
import copy
import json
import os
import runpy
import sys
from typing import Any

READS: set[str] = set()
KEYS: set[str] = set()
PAUSED = [0]  # > 0 while the validation or a copy reads the params wholesale


def _read(path: Any) -> None:
    READS.add(os.path.relpath(os.path.abspath(os.fsdecode(path))))


def _audit(event: str, args: tuple) -> None:
    if event != "open" or not isinstance(args[0], (str, bytes, os.PathLike)):
        return
    mode, flags = args[1], args[2]
    writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(
        flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
    if not writing:
        _read(args[0])


class Tracked(dict):
    """A params mapping that records the dotted key of every value read from it (a nested mapping is recorded
    where its own values are read)."""

    def __init__(self, data: dict, prefix: str = "") -> None:
        super().__init__({k: Tracked(v, f"{prefix}{k}.") if isinstance(v, dict) else v for k, v in dict.items(data)})
        self.prefix = prefix

    def _value(self, key: Any) -> Any:
        value = dict.__getitem__(self, key)
        if not PAUSED[0] and not isinstance(value, Tracked):
            KEYS.add(f"{self.prefix}{key}")
        return value

    def __getitem__(self, key: Any) -> Any:
        return self._value(key)

    def get(self, key: Any, default: Any = None) -> Any:
        return self._value(key) if key in self else default

    def items(self):  # type: ignore[override]
        return [(k, self._value(k)) for k in self]

    def values(self):  # type: ignore[override]
        return [self._value(k) for k in self]

    def __deepcopy__(self, memo: dict) -> "Tracked":
        return Tracked({k: copy.deepcopy(dict.__getitem__(self, k), memo) for k in self}, self.prefix)


def _paused(function):
    def run(*args, **kwargs):
        PAUSED[0] += 1
        try:
            return function(*args, **kwargs)
        finally:
            PAUSED[0] -= 1
    return run


def _install() -> None:
    import safetensors
    import safetensors.torch
    import yaml

    real_open, real_load = safetensors.safe_open, safetensors.torch.load_file
    safetensors.safe_open = lambda path, *a, **k: (_read(path), real_open(path, *a, **k))[1]
    safetensors.torch.load_file = lambda path, *a, **k: (_read(path), real_load(path, *a, **k))[1]
    yaml.SafeDumper.add_representer(Tracked, lambda dumper, data: dumper.represent_dict(data.items()))

    import carso.params

    carso.params.validate = _paused(carso.params.validate)
    real_load_params = carso.params.load_params
    carso.params.load_params = lambda *a, **k: Tracked(real_load_params(*a, **k))


def _write() -> None:
    modules = sorted(m for m in sys.modules if m == "carso" or m.startswith("carso."))
    with open(os.environ["CARSO_TRACE"], "w") as f:
        json.dump({"imports": modules, "reads": sorted(READS), "keys": sorted(KEYS)}, f)


if __name__ == "__main__":
    _install()
    sys.addaudithook(_audit)
    atexit.register(_write)
    sys.argv = ["carso", *sys.argv[1:]]
    runpy.run_module("carso", run_name="__main__")
