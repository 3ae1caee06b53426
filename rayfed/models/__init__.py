"""Model builders and parameter-role introspection.

:func:`build_model` makes the model every client trains (ViT, BERT, MLP, a local pre-trained
Hugging Face folder, or any ``factory(info)``); :func:`forward_logits` runs any of them;
:func:`attention_projections`, :func:`head_parameter_names` and
:func:`input_layer_parameter_names` name parameters by role, also through a PEFT wrapper.
"""

from rayfed.models.builders import (
    LinearModel,
    MLPClassifier,
    ModelFactory,
    build_model,
    forward_logits,
)
from rayfed.models.introspect import (
    AttentionProjection,
    attention_projections,
    head_parameter_names,
    input_layer_parameter_names,
    param_names,
)

__all__ = [
    "AttentionProjection",
    "LinearModel",
    "MLPClassifier",
    "ModelFactory",
    "attention_projections",
    "build_model",
    "forward_logits",
    "head_parameter_names",
    "input_layer_parameter_names",
    "param_names",
]
