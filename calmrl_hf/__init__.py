"""calmrl_hf: CalMRL (calibrated multimodal representation learning with missing modalities) for transformers.

`import calmrl_hf` is cheap (no torch, no transformers: `calmrl --help` answers at once). The classes below load on
first use (PEP 562), and the model registers with transformers' auto classes when either side loads: when one of
the package's model modules finishes importing (`from calmrl_hf import CalMRLModel`), or when transformers'
AutoConfig / AutoModel / AutoProcessor module does (then the matching module of the package is imported). So
`import calmrl_hf` followed by `AutoModel.from_pretrained(folder)` resolves model_type "calmrl" to the installed
classes, whichever of the two is imported first; and `register_for_auto_class` makes `save_pretrained` copy the
code, so `trust_remote_code=True` works without the package.
"""

import functools
import importlib
import importlib.abc
import sys
import threading


__version__ = "0.1.0"

# public name -> the module of the package that defines it
_EXPORTS = {
    "CalMRLConfig": "configuration_calmrl",
    "CalMRLEncoding": "modeling_calmrl",
    "CalMRLModel": "modeling_calmrl",
    "CalMRLOutput": "modeling_calmrl",
    "CalMRLPreTrainedModel": "modeling_calmrl",
    "CalMRLProcessor": "processing_calmrl",
    "FeatureEncoderConfig": "feature_encoder",
    "FeatureEncoderModel": "feature_encoder",
    "PPCAImputer": "imputer",
    "PPCAStatistics": "imputer",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


def _register_configuration() -> None:
    from transformers import AutoConfig

    from .configuration_calmrl import CalMRLConfig

    AutoConfig.register(CalMRLConfig.model_type, CalMRLConfig, exist_ok=True)
    CalMRLConfig.register_for_auto_class()


def _register_model() -> None:
    from transformers import AutoModel, AutoModelForZeroShotImageClassification

    from .configuration_calmrl import CalMRLConfig
    from .modeling_calmrl import CalMRLModel

    AutoModel.register(CalMRLConfig, CalMRLModel, exist_ok=True)
    AutoModelForZeroShotImageClassification.register(CalMRLConfig, CalMRLModel, exist_ok=True)  # its pipeline
    CalMRLModel.register_for_auto_class("AutoModel")


def _register_processor() -> None:
    from .configuration_calmrl import CalMRLConfig
    from .processing_calmrl import register_auto_processor

    register_auto_processor(CalMRLConfig)


# each module of the package whose classes register with an auto class: (transformers' module of that auto class,
# the registration)
_REGISTRATIONS = {
    f"{__name__}.configuration_calmrl": ("transformers.models.auto.configuration_auto", _register_configuration),
    f"{__name__}.modeling_calmrl": ("transformers.models.auto.modeling_auto", _register_model),
    f"{__name__}.processing_calmrl": ("transformers.models.auto.processing_auto", _register_processor),
}
_WATCHED_PACKAGES = (f"{__name__}.", "transformers.")


class _Registrations:
    """What the modules imported so far call for (registrations, imports of the package's modules), run once no
    module of transformers or of the package is being imported: in the middle of an import, the package's
    modules could meet a partly initialised transformers (an auto module often finishes before modeling_utils)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.importing = 0  # watched modules being executed, in any thread
        self.pending = []  # the actions, in order
        self.running = False

    def note(self, name: str) -> None:
        """`name` has just been imported: queue what it calls for."""
        if name in _REGISTRATIONS:
            self.pending.append(_REGISTRATIONS[name][1])
        for module, (auto_module, _) in _REGISTRATIONS.items():
            if auto_module == name and module not in sys.modules:
                self.pending.append(functools.partial(importlib.import_module, module))

    def run_pending(self) -> None:
        """Run the queued actions unless an import is still under way (or they are running: an action's own
        imports queue more, which this loop then runs)."""
        with self.lock:
            if self.importing or self.running:
                return
            self.running = True
        try:
            while self.pending:
                self.pending.pop(0)()
        finally:
            self.running = False


_registrations = _Registrations()


class _RegisteringLoader(importlib.abc.Loader):
    """A watched module's own loader, counted while it executes; once nothing watched is importing, the queued
    registrations run."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        with _registrations.lock:
            _registrations.importing += 1
        try:
            self.loader.exec_module(module)
        finally:
            with _registrations.lock:
                _registrations.importing -= 1
        _registrations.note(module.__name__)
        _registrations.run_pending()

    def __getattr__(self, attribute):  # get_source, get_filename, ... of the wrapped loader
        return getattr(self.loader, attribute)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds the modules of transformers and of the package with the other finders and wraps their loader; finds
    nothing itself."""

    is_calmrl_registration = True

    def __init__(self):
        self.searching = threading.local()  # the names this thread is finding: a finder that wraps this one

    def find_spec(self, name, path=None, target=None):
        searching = self.searching.__dict__.setdefault("names", set())
        if not name.startswith(_WATCHED_PACKAGES) or name in searching:  # (and is asked below) must not loop
            return None
        searching.add(name)
        try:
            for finder in sys.meta_path:
                find_spec = getattr(finder, "find_spec", None)
                spec = None if finder is self or find_spec is None else find_spec(name, path, target)
                if spec is not None:
                    if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                        spec.loader = _RegisteringLoader(spec.loader)
                    return spec
            return None
        finally:
            searching.discard(name)


# one registration finder (a reload of the package replaces it), first, so that it sees the watched imports
sys.meta_path[:] = [_RegisterAfterImport()] + [finder for finder in sys.meta_path
                                               if not getattr(finder, "is_calmrl_registration", False)]
for _auto_module in sorted({auto_module for auto_module, _ in _REGISTRATIONS.values()}):
    if _auto_module in sys.modules:  # transformers' auto classes were imported first
        _registrations.note(_auto_module)
_registrations.run_pending()
