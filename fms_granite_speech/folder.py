"""The layout of an HF Granite Speech checkpoint folder, checked before anything reads a weight.

A folder written by transformers' ``save_pretrained`` holds ``config.json``, either ``model.safetensors`` or
``model.safetensors.index.json`` plus the shards it names, and optionally a peft adapter (``adapter_config.json`` +
``adapter_model.safetensors``). Every loader of this project (``checkpoint.load_checkpoint``,
``fms_granite_speech.get_model``, ``get_model("hf_pretrained")``, the parity engine's HF side) calls
``check_checkpoint_folder`` first, so the same folder is refused the same way everywhere:

* no safetensors weights (only ``pytorch_model.bin`` / ``*.pt``): pickles are never loaded, by FMS or by
  transformers, since unpickling runs arbitrary code;
* two weight sets (an index with its shards and a ``model.safetensors`` too, or stray ``*.safetensors``): FMS's
  ``get_model`` loads every ``*.safetensors`` of a folder and transformers only the indexed ones, so the two sides of a
  parity run would read different weights;
* a truncated file or a damaged safetensors header: named with the file, before a loader fails inside safetensors.
"""

import functools
import json
import struct
from pathlib import Path
from typing import Any, Optional, Union

__all__ = [
    "ADAPTER_WEIGHTS",
    "CheckpointFolderError",
    "INDEX",
    "SINGLE",
    "check_checkpoint_folder",
    "check_safetensors_file",
    "check_safetensors_folder",
    "read_config_json",
    "read_json",
]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_PICKLES = ("*.bin", "*.pt", "*.pth", "*.ckpt")
_HEADER_LIMIT = 100 * 1024 * 1024  # safetensors refuses headers above 100 MB


class CheckpointFolderError(ValueError):
    """A checkpoint folder (or a file in it) that cannot be loaded as it is; the message names the file and the fix."""


def _file_state(path: Path) -> tuple:
    """What identifies one version of a file: its resolved path, inode, size and modification time (ns)."""
    st = path.stat()
    return str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=64)
def _read_bytes(state: tuple) -> bytes:
    return Path(state[0]).read_bytes()


def read_json(path: Union[str, Path]) -> Any:
    """A JSON file's content, read from disk once per version of the file (path, inode, size, modification time):
    the folder checks, the config and adapter readers and the HF side of one run share one read of each file; an
    edited file is read again. Each call parses afresh, so callers may change what they get.

    Raises:
        OSError: the file cannot be read; json.JSONDecodeError / UnicodeDecodeError: it is not JSON (callers name the
            file and the fix).
    """
    return json.loads(_read_bytes(_file_state(Path(path))))


def read_config_json(folder: Union[str, Path]) -> Any:
    """A checkpoint folder's ``config.json`` as transformers reads it (``read_json``, then its tagged non-finite
    floats, ``{"__float__": "Infinity"}``, which its ``to_json_string`` writes for inf and NaN, e.g. granitemoehybrid's
    ``time_step_limit``, read back as floats).

    Raises:
        OSError, json.JSONDecodeError, UnicodeDecodeError: as ``read_json``.
    """
    return _special_floats(read_json(Path(folder) / "config.json"))


def _special_floats(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__float__"}:
            return float(value["__float__"])
        return {k: _special_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_special_floats(v) for v in value]
    return value


_CHECKED: set = set()  # versions of safetensors files whose header check_safetensors_file has passed


def check_safetensors_file(path: Union[str, Path]) -> None:
    """Refuse a file that is not a complete safetensors file, reading only its header.

    The format (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length, a JSON header
    naming every tensor's dtype, shape and byte range, then the data. The header must parse, and the file must be at
    least as long as the last byte range it promises (a truncated download is caught here).

    Raises:
        CheckpointFolderError (a ValueError): unreadable, too short, a header that is not safetensors JSON, or data
            shorter than the header promises.
    """
    path = Path(path)
    try:
        state = _file_state(path)
        if state in _CHECKED:  # this version of the file passed already (every loader of a run checks it)
            return
        size = state[2]
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointFolderError(f"{path} is not a safetensors file ({size} bytes, no header); re-download "
                                            "or re-save it")
            (n,) = struct.unpack("<Q", head)
            if n > _HEADER_LIMIT or 8 + n > size:
                raise CheckpointFolderError(f"{path} has a damaged safetensors header (it claims {n} header bytes in a "
                                            f"{size}-byte file); re-download or re-save it")
            header = json.loads(f.read(n))
    except OSError as err:
        raise CheckpointFolderError(f"cannot read {path}: {err.strerror or err}") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointFolderError(f"{path} has a damaged safetensors header (not JSON); re-download or re-save "
                                    "it") from None
    if not isinstance(header, dict):
        raise CheckpointFolderError(f"{path} has a damaged safetensors header (not a JSON object)")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise CheckpointFolderError(f"{path}: tensor {name!r} has no valid data_offsets in the safetensors header; "
                                        "re-download or re-save the file")
        end = max(end, offsets[1])
    if 8 + n + end > size:
        raise CheckpointFolderError(f"{path} is truncated: its header promises {8 + n + end} bytes, the file has "
                                    f"{size}; re-download or re-save it")
    _CHECKED.add(state)


def check_safetensors_folder(path: Union[str, Path], *, for_glob: bool = False) -> tuple[list[Path], Optional[Path]]:
    """The model weight files of a checkpoint folder, and its adapter weights file (or None).

    With ``model.safetensors.index.json`` the model files are exactly the shards the index names (each must exist);
    otherwise ``model.safetensors``. Every returned file's header is checked (``check_safetensors_file``).

    Args:
        path: the checkpoint folder.
        for_glob: also require that the folder's ``*.safetensors`` files are exactly those files plus
            ``adapter_model.safetensors`` -- what FMS's ``get_model`` (which loads every ``*.safetensors``) needs.

    Raises:
        FileNotFoundError: no such folder, or a shard named by the index is missing.
        CheckpointFolderError (a ValueError): no safetensors weights (pickles only: refused), an unreadable index,
            a damaged or truncated file, or (``for_glob``) other ``*.safetensors`` files that would be mixed in.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder not found: {path}")
    index = path / INDEX
    if index.is_file():
        try:
            weight_map = read_json(index)["weight_map"]
            files = [path / name for name in sorted(set(weight_map.values()))]
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as err:
            raise CheckpointFolderError(f"{index} is not a safetensors index (needs a 'weight_map' object of tensor "
                                        f"name -> shard file): {err}") from None
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"{index.name} names shards that are not in {path}: {', '.join(absent)}")
    elif (path / SINGLE).is_file():
        files = [path / SINGLE]
    else:
        pickles = sorted(p.name for pattern in _PICKLES for p in path.glob(pattern))
        if pickles:
            raise CheckpointFolderError(
                f"{path} holds only pickled weights ({', '.join(pickles[:3])}); they are never loaded (unpickling runs "
                "arbitrary code). Convert them to safetensors once, e.g. load with transformers where you trust the "
                "file and save_pretrained(..., safe_serialization=True)")
        raise CheckpointFolderError(f"{path} has neither {INDEX} nor {SINGLE}: not a safetensors checkpoint folder")
    adapter = path / ADAPTER_WEIGHTS
    adapter = adapter if adapter.is_file() else None
    if index.is_file() and (path / SINGLE).is_file() and (path / SINGLE) not in files:
        raise CheckpointFolderError(
            f"{path} holds two weight sets: the shards {INDEX} names and a {SINGLE}. FMS would load both, transformers "
            "only the shards, so the two sides would run different weights; remove the stale set")
    if for_glob:
        allowed = {f.name for f in files} | {ADAPTER_WEIGHTS}
        extra = sorted(p.name for p in path.glob("*.safetensors") if p.name not in allowed)
        if extra:
            source = f"the shards {INDEX} names" if index.is_file() else SINGLE
            raise CheckpointFolderError(
                f"{path} holds safetensors files besides {source} and {ADAPTER_WEIGHTS}: {', '.join(extra)}. FMS's "
                "get_model loads every *.safetensors in a folder and would mix them in; remove them, or load with "
                "fms_granite_speech.checkpoint.load_checkpoint, which opens only the indexed shards")
    for f in files + ([adapter] if adapter is not None else []):
        check_safetensors_file(f)
    return files, adapter


def check_checkpoint_folder(path: Union[str, Path]) -> Path:
    """Everything every loader checks before reading a weight: the folder, ``config.json``, the weight files.

    Returns the folder as a ``Path``.

    Raises:
        FileNotFoundError: no such folder.
        CheckpointFolderError (a ValueError): not a folder, no or unreadable ``config.json``, not a Granite Speech
            config, or a weight-file problem (see ``check_safetensors_folder`` with ``for_glob=True``).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint folder not found: {path}")
    if not path.is_dir():
        raise CheckpointFolderError(f"{path} is a file, not a checkpoint folder; give the folder save_pretrained wrote")
    config = path / "config.json"
    if not config.is_file():
        raise CheckpointFolderError(f"{path} has no config.json: not an HF checkpoint folder (give the folder "
                                    "save_pretrained wrote, or a downloaded ibm-granite/granite-speech-3.3-* snapshot)")
    try:
        raw = read_json(config)
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise CheckpointFolderError(f"{config} is not readable JSON ({err}); restore the checkpoint's config.json") \
            from None
    from fms_granite_speech.config import MODEL_TYPES

    if not isinstance(raw, dict) or raw.get("model_type") not in MODEL_TYPES:
        got = raw.get("model_type") if isinstance(raw, dict) else type(raw).__name__
        raise CheckpointFolderError(f"{config}: model_type={got!r}, expected one of {', '.join(MODEL_TYPES)}")
    check_safetensors_folder(path, for_glob=True)
    return path
