"""olm.zoo: named presets of public model families and Hugging Face checkpoint import/export.

``from_hf(dir_or_model)`` -> olm LM with the same logits; ``to_hf(model, out_dir)`` -> a dir that
``transformers.AutoModelForCausalLM`` loads; ``PRESETS`` / ``preset_config(name)`` -> published sizes and ``*_tiny``
test flavours. Only ``from_hf`` of an in-memory ``transformers`` model needs ``transformers`` (the ``[hf]`` extra).
"""

from olm.zoo.families import FAMILIES, Family, TensorMap, infer_family
from olm.zoo.hf import from_hf, to_hf
from olm.zoo.presets import PRESETS, Preset, count_parameters, preset_config

__all__ = ["FAMILIES", "PRESETS", "Family", "Preset", "TensorMap", "count_parameters", "from_hf", "infer_family",
           "preset_config", "to_hf"]
