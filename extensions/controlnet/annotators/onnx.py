"""onnxruntime sessions for annotator files (DWPose, insightface), with every failure as a clear message."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from modules.plugins import api


def onnx_session(path: Path, *, users: str, extra: str, missing: str, kind: str, fix: str,
                 providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> Any:
    """A session of `path` on those of `providers` onnxruntime has. `users` names what needs onnxruntime
    (said, with the `extra` to install, when it is not installed), `missing` is the message for an absent
    file, and a file onnxruntime cannot load is named as `kind` with `fix`."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise api.InvalidParams(f"{users} run on onnxruntime, which is not installed: "
                                f"pip install onnxruntime (or pip install -e '.[{extra}]')") from None
    if not path.is_file():
        raise api.InvalidParams(missing)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    available = ort.get_available_providers()
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=[p for p in providers if p in available])
    except Exception as err:  # onnxruntime's own exception types (InvalidProtobuf, Fail, ...)
        raise api.InvalidParams(f"{kind} {path} could not be loaded by onnxruntime ({type(err).__name__}); "
                                f"{fix}") from None


def input_size(sess: Any, default: tuple[int, int]) -> tuple[int, int]:
    """The (height, width) of a session's image input, or `default` where the file leaves it dynamic."""
    dims = sess.get_inputs()[0].shape[2:]
    return (dims[0], dims[1]) if len(dims) == 2 and all(isinstance(d, int) for d in dims) else default
