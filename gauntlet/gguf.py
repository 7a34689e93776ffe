"""GGUF model sources: a ``.gguf`` file, or a folder holding one, made an ordinary transformers folder.

transformers reads GGUF files itself (``from_pretrained(folder, gguf_file=name)``, with the ``gguf``
package), dequantizing the weights to float32. The fetch stage does that once per file content: the
result is saved with ``save_pretrained`` under ``$GAUNTLET_HOME/models/gguf/<file sha256>/`` (built in a
folder of its own and renamed into place), so every later stage sees a plain model folder and its
content hash, and never knows the model came as GGUF. No Prefect here.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from gauntlet.files import is_complete, partial_dir, publish_dir, write_text
from gauntlet.hashing import sha256_files
from gauntlet.state import models_cache

log = logging.getLogger(__name__)

GGUF_HINT = "install the gguf package (pip install gguf) to read GGUF model files"


class GGUFError(ValueError):
    """A GGUF source that cannot be used (several files in the folder, no gguf package, unreadable file)."""


def find_gguf(path: Path) -> Path | None:
    """The GGUF file ``path`` names: itself, or the one ``*.gguf`` in a folder without config.json; None
    when ``path`` is not a GGUF source. GGUFError when a folder holds several."""
    if path.is_file():
        return path if path.suffix == ".gguf" else None
    if not path.is_dir() or (path / "config.json").exists():
        return None
    found = sorted(path.glob("*.gguf"))
    if len(found) > 1:
        raise GGUFError(f"{path} holds {len(found)} GGUF files ({[f.name for f in found]}); point model.source at "
                        "one of them")
    return found[0] if found else None


def dequantized_folder(gguf_file: Path) -> Path:
    """The GGUF file as a transformers folder (float32 weights, tokenizer, chat template), built once per
    file content."""
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError as e:
        raise GGUFError(GGUF_HINT) from e
    sha = sha256_files([gguf_file])
    target = models_cache() / "gguf" / sha[:32]
    if is_complete(target):
        log.info("GGUF %s: already converted at %s", gguf_file.name, target)
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("GGUF %s: dequantizing to a transformers folder (once per file)", gguf_file.name)
    building = partial_dir(target)  # this process's own folder, renamed into place when done
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    except Exception as e:
        shutil.rmtree(building, ignore_errors=True)
        raise GGUFError(f"{gguf_file}: transformers could not read it as GGUF ({type(e).__name__}: {e})") from e
    # The weights are plain tensors now; what marks the model as quantized only stops save_pretrained.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(building)
    tokenizer.save_pretrained(building)
    write_text(building / "SOURCE.txt", f"dequantized by transformers from {gguf_file.name} (sha256 {sha})\n")
    return publish_dir(building, target)
