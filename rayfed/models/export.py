"""Write one model in the ecosystem's formats.

* a PEFT model: its adapter folder (``save_pretrained``: ``adapter_config.json`` and
  ``adapter_model.safetensors``), which ``peft.PeftModel.from_pretrained(base, folder)`` loads onto
  the base model;
* a Hugging Face model: a ``save_pretrained`` folder (safetensors) that ``AutoModel*.from_pretrained``
  loads;
* any other ``nn.Module``: ``model.safetensors`` (its state dict, safetensors) with
  ``rayfed_model.json`` saying how to rebuild the module (``load_state_dict`` after building it from
  the run's config or model factory).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Optional

from torch import nn

__all__ = ["export_model"]


def export_model(model: nn.Module, directory: str | os.PathLike, *, meta: Optional[dict[str, Any]] = None) -> Path:
    """Write ``model`` to ``directory`` (see the module docstring); ``meta`` goes to ``rayfed_model.json``."""
    from rayfed.models.peft import export_adapter

    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    transformers = sys.modules.get("transformers")
    is_hf = transformers is not None and isinstance(model, transformers.PreTrainedModel)
    if is_hf or type(model).__module__.startswith("peft"):
        export_adapter(model, path)
        kind = "peft" if not is_hf else "huggingface"
    else:
        from safetensors.torch import save_file

        sd = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
        save_file(sd, str(path / "model.safetensors"))
        kind = "state_dict"
    (path / "rayfed_model.json").write_text(json.dumps({"format": kind, "class": type(model).__qualname__,
                                                        **(meta or {})}, indent=1, default=str))
    return path
