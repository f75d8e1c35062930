"""What every OR-tools MathOpt solve in tiermap shares (placement, fusion and the capacity LP)."""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import threading
from collections.abc import Iterator
from types import ModuleType


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """Silence file descriptor 1 during a solve: HiGHS prints debug lines there directly."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


_NATIVE_MODULES = ("ortools.math_opt.python.mathopt", "ortools.math_opt.model_pb2")
_load_lock = threading.Lock()


def load_mathopt() -> ModuleType:
    """Import OR-tools MathOpt so that its native code binds to its own protobuf and abseil.

    Every MathOpt import in tiermap goes through here. The cause it guards against: TensorFlow
    (and so keras-hub) loads `_pywrap_tensorflow_internal` with RTLD_GLOBAL, which puts its own
    build of protobuf's C++ runtime (exported by libtensorflow_framework.so.2) in the process'
    global symbol scope. OR-tools' extension modules, loaded later, then resolve their protobuf
    symbols to TensorFlow's copy instead of the libprotobuf they ship with, and the first C++ ->
    Python model export (`Model.export_model`, called by `mathopt.solve`) dies with SIGSEGV.
    Loading OR-tools' native modules with RTLD_DEEPBIND makes each of them look up symbols in its
    own dependencies first, so they use their own protobuf whatever was loaded before. The flags
    are process-wide, so they are set under a lock and restored at once. If OR-tools was imported
    before tiermap the binding is already made and this returns the module as it is.
    """
    with _load_lock:
        if all(name in sys.modules for name in _NATIVE_MODULES):
            return sys.modules[_NATIVE_MODULES[0]]
        deepbind = getattr(os, "RTLD_DEEPBIND", 0)  # Linux/glibc only; 0 elsewhere
        saved = sys.getdlopenflags() if hasattr(sys, "getdlopenflags") else None
        if saved is not None and deepbind:
            sys.setdlopenflags(os.RTLD_NOW | os.RTLD_LOCAL | deepbind)
        try:
            for name in _NATIVE_MODULES:
                importlib.import_module(name)
        finally:
            if saved is not None and deepbind:
                sys.setdlopenflags(saved)
        return sys.modules[_NATIVE_MODULES[0]]
