"""Hugging Face checkpoint import/export: ``config.json`` + ``*.safetensors`` (sharded too), never the network, never
pickle. ``transformers`` is needed only to pass an in-memory ``transformers`` model to ``from_hf``."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch

import olm
from olm.nn.structure import Block, meta_device
from olm.registry import ConfigError
from olm.zoo.families import FAMILIES, Family, TensorMap, family_of_architecture, infer_family

INDEX_FILE = "model.safetensors.index.json"
# Buffers some checkpoints carry that olm derives from the config instead.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


def read_config(directory: str | os.PathLike) -> dict:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; expected a Hugging Face checkpoint dir (config.json + *.safetensors)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from exc


class Checkpoint:
    """Lazy access to the tensors of a local safetensors checkpoint (one file or shards with an index)."""

    def __init__(self, directory: str | os.PathLike):
        from safetensors import safe_open

        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.directory.glob("*.safetensors"))
        if not files:
            pickled = [p.name for p in self.directory.glob("*.bin")] + [p.name for p in self.directory.glob("*.pt")]
            hint = f" (found {', '.join(pickled)}: pickle files are not read; convert them to safetensors)" if pickled else ""
            raise FileNotFoundError(f"{self.directory} holds no *.safetensors files{hint}")
        self.handles = {name: safe_open(str(self.directory / name), framework="pt") for name in files}
        self.location = {key: name for name, handle in self.handles.items() for key in handle.keys()}

    def resolve(self, name: str) -> str | None:
        """The stored name of ``name``; checkpoints saved from the bare model lack the ``model.``/``transformer.`` prefix."""
        if name in self.location:
            return name
        short = name.split(".", 1)[1]
        return short if short in self.location else None

    def get(self, name: str) -> torch.Tensor:
        return self.handles[self.location[name]].get_tensor(name)


def _materialize_buffers(model: torch.nn.Module) -> None:
    """Rebuild the non-persistent buffers (RoPE tables, ALiBi slopes) of a model built on the meta device."""
    for module in model.modules():
        if isinstance(module, Block) and any(b.is_meta for b in module.buffers(recurse=False)):
            if hasattr(module, "materialize_buffers"):  # RoPE: tables shared by the layers, computed once
                module.materialize_buffers()
                continue
            fresh = type(module)(**module.config)
            for name, buffer in fresh.named_buffers(recurse=False):
                setattr(module, name, buffer)


def _build_empty(config: dict) -> torch.nn.Module:
    with meta_device():  # no memory and no random init for weights about to be overwritten
        return olm.build_model(config)


def _weights(model) -> dict[str, torch.Tensor]:
    """Parameters (a tied head counted once) and persistent buffers (MoE balancing biases): what a checkpoint holds."""
    saved = set(model.state_dict(keep_vars=True))
    return dict(model.named_parameters()) | {n: b for n, b in model.named_buffers() if n in saved}


def _select(maps: list[TensorMap], model) -> list[TensorMap]:
    """The maps of weights this model has; every one must be covered (tied head counted once)."""
    params = _weights(model)
    maps = [m for m in maps if m.olm in params]
    uncovered = set(params) - {m.olm for m in maps}
    if uncovered:  # a family table out of step with olm: a bug, not a user error
        raise RuntimeError(f"no Hugging Face tensor maps to olm parameter {sorted(uncovered)[0]!r}")
    return maps


def load_hf_dir(directory: str | os.PathLike, dtype: torch.dtype | None = torch.float32):
    """An olm LM from a local HF checkpoint dir; see :func:`from_hf`."""
    hf = read_config(directory)
    where = f"{Path(directory) / 'config.json'}"
    architecture = (hf.get("architectures") or [hf.get("model_type")])[0]
    if architecture is None:
        raise ConfigError(f"{where} names no 'architectures' or 'model_type'")
    family = family_of_architecture(architecture, where)
    config = family.to_olm(hf)
    checkpoint = Checkpoint(directory)
    model = _build_empty(config)
    weights = _weights(model)
    state, used = {}, set()
    for m in _select(family.tensors(model), model):
        tensors = []
        for name in m.hf:
            stored = checkpoint.resolve(name)
            if stored is None:
                raise ConfigError(f"{checkpoint.directory}: missing tensor {name!r} (for olm {m.olm!r})")
            used.add(stored)
            tensors.append(checkpoint.get(stored))
        try:
            value = m.to_olm(tensors)
        except RuntimeError as exc:
            raise ConfigError(f"{checkpoint.directory}: tensors {', '.join(m.hf)} do not combine: {str(exc).splitlines()[0]}") from exc
        expected = weights[m.olm].shape
        if value.shape != expected:
            shapes = ", ".join(f"{n} {tuple(t.shape)}" for n, t in zip(m.hf, tensors))
            raise ConfigError(f"{checkpoint.directory}: shape mismatch for {shapes}; config.json implies {tuple(expected)} for olm {m.olm!r}")
        state[m.olm] = value.to(dtype) if dtype is not None else value
    # DeepSeek-V3's multi-token-prediction layers follow the last layer; transformers does not load them either.
    extra_layers = f"model.layers.{hf['num_hidden_layers']}." if hf.get("num_nextn_predict_layers") else None
    unused = sorted(k for k in checkpoint.location if k not in used and not k.endswith(IGNORED_SUFFIXES)
                    and not (extra_layers and k.startswith(extra_layers)))
    if unused:
        raise ConfigError(f"{checkpoint.directory}: tensor {unused[0]!r} is not used by the {family.name} mapping ({len(unused)} unused)")
    model.load_state_dict(state, strict=False, assign=True)
    if config.get("tie_embeddings"):
        model.head.linear.weight = model.embedding.token.weight
    _materialize_buffers(model)
    return model


def from_hf(model_or_dir, dtype: torch.dtype | None = torch.float32):
    """An olm ``LM`` equal to a Hugging Face causal LM: a local checkpoint dir or an in-memory ``transformers`` model.

    The dir must hold ``config.json`` and ``*.safetensors`` (one file, or shards with ``model.safetensors.index.json``);
    pickle files are refused. ``dtype`` casts the weights (None keeps the stored dtype). Raises ConfigError, in one
    line, for an unknown architecture, a missing or unused tensor, or a shape that disagrees with ``config.json``.
    """
    if hasattr(model_or_dir, "save_pretrained"):
        # The saved form is the stable one (transformers 5 fuses some weights in memory differently from the hub).
        with tempfile.TemporaryDirectory() as tmp:
            model_or_dir.save_pretrained(tmp, safe_serialization=True)
            return load_hf_dir(tmp, dtype)
    return load_hf_dir(model_or_dir, dtype)


def export_family(model, family: str | None = None) -> tuple[Family, dict]:
    """The Hugging Face family ``model`` exports to (``family``, else inferred) and that family's config fields;
    ConfigError with the reason where no family can express it. Reads only shapes and settings: a model on the meta
    device will do (``olm models`` asks this of every preset)."""
    if family is not None and family not in FAMILIES:
        raise ConfigError(f"family={family!r} is not known; known: {', '.join(FAMILIES)}")
    if getattr(model, "width_multiplier", 1.0) != 1.0:
        raise ConfigError(f"model.parametrization=mup at width multiplier {model.width_multiplier:g}: Hugging Face "
                          "architectures have no output multiplier or 1/d attention scale, so no family can express it")
    for module in model.modules():  # a team's block has no counterpart in any family's modeling code
        kind = getattr(type(module), "component_kind", None)
        if kind is not None and not type(module).__module__.startswith("olm."):
            raise ConfigError(f"{kind} {type(module).component_name!r} ({type(module).__module__}) is not one of "
                              "olm's own components: no Hugging Face family has it")
    chosen: Family = FAMILIES[family] if family else infer_family(model)
    return chosen, chosen.to_hf(model)


def to_hf(model, out_dir: str | os.PathLike, family: str | None = None, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write ``model`` as a Hugging Face checkpoint dir that ``transformers.AutoModelForCausalLM`` loads.

    ``family`` picks the HF architecture (default: inferred from the model's components, see ``infer_family``);
    a model the family cannot express raises ConfigError. Shards above ``max_shard_bytes`` with an index file.
    """
    from safetensors.torch import save_file

    chosen, fields = export_family(model, family)
    params = _weights(model)
    dtype = next(iter(params.values())).dtype
    # olm keeps no special-token ids: no padding row (whose gradient HF would zero), the family's bos/eos defaults.
    hf_config = {"architectures": [chosen.architecture], "model_type": chosen.model_type, **fields,
                 "pad_token_id": None, "dtype": str(dtype).removeprefix("torch.")}
    tensors = {}
    for m in _select(chosen.tensors(model), model):
        value = params[m.olm].detach()
        if m.vocab:
            value = value[: model.vocab_size]  # drop olm's padding rows
        for name, part in zip(m.hf, m.to_hf(value)):
            tensors[name] = part.contiguous().cpu().clone()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    shards, size = [{}], 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
        return out
    weight_map = {}
    for i, shard in enumerate(shards):
        filename = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / filename), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, filename))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    return out
