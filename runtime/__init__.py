"""The reshift runtime: load a compiled artifact (``model.so`` + ``meta.json``) and run it.

Imports neither torch nor onnx (an edge device has only the runtime); tvm loads on first use.
"""

from reshift.runtime.module import LoadedModel, load
from reshift.runtime.remote import DeviceError, RemoteModel

__all__ = ["DeviceError", "LoadedModel", "RemoteModel", "load"]
