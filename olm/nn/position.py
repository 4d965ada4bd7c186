"""Registered position encodings.

Each class says where it acts through ``applies_to``:
- ``"attention"``: rotary embeddings rotate queries and keys (``rotate``); ALiBi adds a bias to scores (``bias``);
- ``"embedding"``: a learned absolute table added to the token embeddings (``forward``);
- ``"none"``: no position information at all (attention is then permutation-equivariant apart from the mask).
"""

import contextlib
import contextvars
import math

import torch
from torch import nn

from olm.nn.structure import Block
from olm.registry import ConfigError, register, where


# Keys of `scaling` per type: required, then optional with their defaults.
ROPE_SCALING = {
    "linear": ({"factor"}, {}),
    "llama3": ({"factor", "original_max_seq_len"}, {"low_freq_factor": 1.0, "high_freq_factor": 4.0}),
    "yarn": ({"factor", "original_max_seq_len"}, {"beta_fast": 32.0, "beta_slow": 1.0, "mscale": None,
                                                  "mscale_all_dim": None, "attention_factor": None, "truncate": True}),
    "longrope": ({"factor", "original_max_seq_len", "short_factor", "long_factor"}, {"attention_factor": None}),
}


def _check_scaling(scaling: dict) -> tuple[str, dict]:
    kind = scaling.get("type", "llama3")
    if kind not in ROPE_SCALING:
        raise ConfigError(f"{where('scaling.type')}={kind!r} is not supported; known: {', '.join(ROPE_SCALING)}")
    required, optional = ROPE_SCALING[kind]
    for key in scaling:
        if key != "type" and key not in required and key not in optional:
            raise ConfigError(f"{where('scaling.' + key)} is not a {kind} scaling key; known: "
                              f"{', '.join(sorted(required | set(optional)))}")
    for key in sorted(required - set(scaling)):
        raise ConfigError(f"{where('scaling.' + key)} must be set for {kind} scaling")
    merged = {**optional, **scaling}
    for key in ("factor", "original_max_seq_len", "beta_fast", "beta_slow", "low_freq_factor", "high_freq_factor"):
        value = merged.get(key)
        if key in merged and (not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0):
            raise ConfigError(f"{where('scaling.' + key)}={value!r} must be a positive number")
    return kind, merged


def _rope_inverse_frequencies(head_dim: int, base: float, scaling: dict | None, long: bool = False) -> torch.Tensor:
    """Per-pair rotation frequencies; ``long`` picks LongRoPE's factors for sequences past the original length."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if not scaling:
        return inv_freq
    kind, scaling = _check_scaling(scaling)
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor
    if kind == "longrope":
        # LongRoPE (Ding et al. 2024): one searched rescale factor per frequency, a short set used up to the original
        # length and a long set beyond it (Phi-3 128k).
        for key in ("short_factor", "long_factor"):
            values = scaling[key]
            if not isinstance(values, (list, tuple)) or len(values) != head_dim // 2 or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values):
                raise ConfigError(f"{where('scaling.' + key)} must be {head_dim // 2} positive numbers "
                                  f"(one per rotated pair of rotary_dim={head_dim})")
        return inv_freq / torch.tensor(scaling["long_factor" if long else "short_factor"], dtype=torch.float64)
    original = float(scaling["original_max_seq_len"])
    if kind == "yarn":
        # YaRN (Peng et al. 2023, "YaRN: Efficient Context Window Extension"): dimensions that turn fewer than
        # beta_slow times over the original context are interpolated (divided by factor), those turning more than
        # beta_fast times are kept, with a linear ramp between the two dimension indices.
        def dimension_of(rotations: float) -> float:
            return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = dimension_of(float(scaling["beta_fast"])), dimension_of(float(scaling["beta_slow"]))
        if scaling["truncate"]:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, head_dim - 1)
        span = high - low if high != low else 1e-3  # as the reference code: a negative span keeps every dimension
        ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / span).clamp(0, 1)
        return inv_freq / factor * ramp + inv_freq * (1 - ramp)
    # Llama 3.1+ "frequency-dependent" scaling: long wavelengths are slowed by `factor`, short ones kept, and the
    # band between low_freq_factor and high_freq_factor is interpolated smoothly.
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    wavelength = 2 * math.pi / inv_freq
    smooth = (original / wavelength - low) / (high - low)
    scaled = torch.where(wavelength > original / low, inv_freq / factor, inv_freq)
    middle = (wavelength <= original / low) & (wavelength >= original / high)
    return torch.where(middle, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)


def _rope_attention_factor(scaling: dict | None) -> float:
    """The scale on cos and sin (so on attention logits, squared) of YaRN (0.1 ln(factor) + 1) and LongRoPE
    (sqrt(1 + ln(factor) / ln(original length))) unless given; 1 for the other kinds."""
    if not scaling or scaling.get("type", "llama3") not in ("yarn", "longrope"):
        return 1.0
    kind, scaling = _check_scaling(scaling)
    if scaling["attention_factor"] is not None:
        return float(scaling["attention_factor"])
    if kind == "longrope":
        factor = float(scaling["factor"])
        return 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(float(scaling["original_max_seq_len"])))

    def log_scale(factor: float, mscale: float = 1.0) -> float:
        return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0

    factor, mscale, mscale_all_dim = float(scaling["factor"]), scaling["mscale"], scaling["mscale_all_dim"]
    if mscale and mscale_all_dim:
        return log_scale(factor, float(mscale)) / log_scale(factor, float(mscale_all_dim))
    return log_scale(factor)


@register("position", "rope")
class RotaryEmbedding(Block):
    """Rotary position embedding (rotate-half layout, as in Llama/GPT-NeoX); optional context-extension scaling:
    ``scaling: {type: llama3|yarn|longrope|linear, factor, original_max_seq_len, ...}`` (keys per type in
    ``ROPE_SCALING``)."""

    applies_to = "attention"

    def __init__(
        self,
        head_dim: int,
        max_seq_len: int,
        base: float = 10000.0,
        scaling: dict | None = None,
        rotary_dim: int | None = None,
    ):
        super().__init__()
        self.rotary_dim = rotary_dim or head_dim
        if self.rotary_dim % 2 or self.rotary_dim > head_dim:
            raise ConfigError(f"{where('rotary_dim')}={self.rotary_dim} must be even and at most head_dim={head_dim}")
        with torch.device("cpu"):  # checks the scaling settings; arange on the meta device would load torch._dynamo
            _rope_inverse_frequencies(self.rotary_dim, base, scaling)
        # The cos/sin tables depend only on these values: the layers of one model (built inside shared_rope_tables(),
        # as LM does) with the same ones share one pair of tensors, moved once per `.to()`. Per-layer copies would
        # cost, e.g., 128 MB per layer at 131k positions. Not persistent: derived from the config, so checkpoints
        # stay small and never disagree with it.
        shared = _SHARED_TABLES.get()
        key = (self.rotary_dim, max_seq_len, float(base), repr(sorted((scaling or {}).items())))
        tables = shared.get(key) if shared is not None else None
        if tables is None:
            tables = _RopeTables(self.rotary_dim, max_seq_len, base, scaling)
            if shared is not None:
                shared[key] = tables
        self.tables = tables
        # LongRoPE: the long tables serve sequences that end past this position (as transformers decides per call).
        self.long_after = int(scaling["original_max_seq_len"]) if scaling and scaling.get("type") == "longrope" else None
        for name, table in tables.tensors.items():
            self.register_buffer(name, table, persistent=False)

    def materialize_buffers(self) -> None:
        """Compute the tables (on the CPU) of a model built on the meta device; layers sharing them stay shared."""
        self._buffers.update(self.tables.materialize())

    def _apply(self, fn, recurse=True):
        # Module._apply hands the same fn to every layer: the shared tables are converted by the first layer and
        # reused by the others. Only their device follows fn: they stay fp32 when the model is cast to bf16
        # (rounded angles hurt long positions).
        for name in self.tables.tensors:
            del self._buffers[name]
        try:
            return super()._apply(fn, recurse)
        finally:
            self._buffers.update(self.tables.apply(fn))

    def rotate(self, q: torch.Tensor, k: torch.Tensor, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        # q: (B, H, T, hd), k: (B, KV, T, hd)
        T = q.shape[-2]
        long = self.long_after is not None and offset + T > self.long_after
        cos = (self.long_cos if long else self.cos)[offset : offset + T]
        sin = (self.long_sin if long else self.sin)[offset : offset + T]
        return _rotate(q, cos, sin, self.rotary_dim), _rotate(k, cos, sin, self.rotary_dim)


class _RopeTables:
    """(max_seq_len, rotary_dim) fp32 tables of position x frequency (angles computed in fp64), shared by layers:
    ``cos`` and ``sin``, plus ``long_cos`` and ``long_sin`` for LongRoPE."""

    def __init__(self, rotary_dim: int, max_seq_len: int, base: float, scaling: dict | None):
        self.args = (rotary_dim, max_seq_len, base, scaling)
        names = ["cos", "sin"] + (["long_cos", "long_sin"] if scaling and scaling.get("type") == "longrope" else [])
        if torch.empty(0).is_meta:  # building on the meta device: shapes only
            self.tensors = {name: torch.empty(max_seq_len, rotary_dim) for name in names}
        else:
            self.tensors = self._compute(names)

    def _compute(self, names) -> dict[str, torch.Tensor]:
        rotary_dim, max_seq_len, base, scaling = self.args
        device, scale = torch.empty(0).device, _rope_attention_factor(scaling)
        tensors = {}
        for prefix in ("", "long_") if "long_cos" in names else ("",):
            with torch.device("cpu"):
                inv_freq = _rope_inverse_frequencies(rotary_dim, base, scaling, long=prefix == "long_")
                angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
            angles = torch.cat([angles, angles], dim=-1)  # (T, rotary_dim)
            tensors[prefix + "cos"] = (scale * angles.cos()).float().to(device)
            tensors[prefix + "sin"] = (scale * angles.sin()).float().to(device)
        return tensors

    def materialize(self) -> dict[str, torch.Tensor]:
        if next(iter(self.tensors.values())).is_meta:
            self.tensors = self._compute(list(self.tensors))
        return self.tensors

    def apply(self, fn) -> dict[str, torch.Tensor]:
        """Follow ``fn``'s device (the first layer moves the tables, the others find them there); keep fp32."""
        device = fn(self.tensors["cos"][:0]).device
        if self.tensors["cos"].device != device:
            self.tensors = {name: t.to(device) for name, t in self.tensors.items()}
        return self.tensors


_SHARED_TABLES: contextvars.ContextVar[dict | None] = contextvars.ContextVar("olm_shared_rope_tables", default=None)


@contextlib.contextmanager
def shared_rope_tables():
    """Rotary embeddings built inside share their cos/sin tables (one pair per distinct configuration)."""
    token = _SHARED_TABLES.set({})
    try:
        yield
    finally:
        _SHARED_TABLES.reset(token)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    rot, keep = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated_half = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    out = (rot.float() * cos + rotated_half.float() * sin).to(x.dtype)
    return torch.cat([out, keep], dim=-1) if keep.shape[-1] else out


@register("position", "learned")
class LearnedPosition(Block):
    """Learned absolute position table added to token embeddings (GPT-2); ``offset`` shifts indices (OPT uses 2)."""

    applies_to = "embedding"
    is_position_table = True

    def __init__(self, embed_dim: int, max_seq_len: int, offset: int = 0):
        super().__init__()
        self.offset = offset
        self.table = nn.Embedding(max_seq_len + offset, embed_dim)

    def forward(self, seq_len: int, start: int = 0) -> torch.Tensor:
        positions = torch.arange(start + self.offset, start + self.offset + seq_len, device=self.table.weight.device)
        return self.table(positions)  # (T, C)


@register("position", "alibi")
class ALiBi(Block):
    """Attention with linear biases (Press et al. 2022): a per-head penalty proportional to the distance."""

    applies_to = "attention"

    def __init__(self, num_heads: int):
        super().__init__()
        self.register_buffer("slopes", self._slopes(num_heads), persistent=False)  # (H,)

    @staticmethod
    def _slopes(num_heads: int) -> torch.Tensor:
        # Geometric sequence from the paper; for non powers of two, interleave the next power's slopes.
        def power_of_two(n):
            start = 2 ** (-(2 ** -(math.log2(n) - 3)))
            return [start**i for i in range(1, n + 1)]

        closest = 2 ** math.floor(math.log2(num_heads))
        slopes = power_of_two(closest)
        if closest != num_heads:
            slopes += power_of_two(2 * closest)[0::2][: num_heads - closest]
        return torch.tensor(slopes, dtype=torch.float32)

    def bias(self, q_len: int, k_len: int, offset: int, device, dtype) -> torch.Tensor:
        query_pos = torch.arange(offset, offset + q_len, device=device)[:, None]
        key_pos = torch.arange(k_len, device=device)[None, :]
        distance = (key_pos - query_pos).abs().to(torch.float32)  # symmetric, so bidirectional use is defined too
        return (-self.slopes.to(device)[:, None, None] * distance).to(dtype)  # (H, Tq, Tk)


@register("position", "none")
class NoPosition(Block):
    """No position encoding (NoPE): causal masking alone carries order information."""

    applies_to = "none"

    def __init__(self):
        super().__init__()
