"""Which type each tensor is written in: the `--type` mixes and the per-tensor choice.

A mix is data: its main type, the type of the output matrix, and a short ordered list of
rules (role, layer condition, type). The llama.cpp mixes reproduce the choices of
llama.cpp's quantizer for the Llama architecture (dense, no importance matrix), so that
`kiln convert --type q4_k_m` and `llama-quantize ... Q4_K_M` give files with the same type
in every tensor and the same general.file_type (tests/test_convert_mixes.py's oracle test).
kiln's own mixes (f32 ... q8_0) keep kiln's simpler rule: token_embd and output in Q8_0
under a 4-bit main type. Every fact about a type (block size, bits) comes from formats'
size table."""
from __future__ import annotations

import re
from dataclasses import dataclass

import formats

GGMLType = formats.GGMLType
FT = formats.LlamaFileType
T = GGMLType

# llama.cpp's general.quantization_version for files with block-quantized tensors
QUANTIZATION_VERSION = 2


def is_block_type(t: GGMLType) -> bool:
    return formats.GGML_QUANT_SIZES[t][0] > 1


def block_size(t: GGMLType) -> int:
    return formats.GGML_QUANT_SIZES[t][0]


def bits_per_weight(t: GGMLType) -> float:
    block, size = formats.GGML_QUANT_SIZES[t]
    return 8.0 * size / block


@dataclass(frozen=True)
class ModelFacts:
    """What the rules look at beyond the tensor itself."""
    n_layer: int
    n_gqa: int = 1        # n_head / n_head_kv: attn_v is n_gqa times smaller than attn_q
    tied: bool = True     # no output.weight: token_embd is also the output matrix

    @property
    def is_llama_70b(self) -> bool:
        # llama.cpp's LLM_TYPE_70B for Llama: 80 layers with grouped-query attention
        return self.n_layer == 80 and self.n_gqa > 1


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's layer pattern for the "_M" mixes: the first and last eighth of the
    layers and every third layer between them (about half of all layers)."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


# condition name -> (predicate of (layer, model), words for --help)
CONDITIONS = {
    "always": (lambda i, m: True, ""),
    "more_bits": (lambda i, m: i is not None and use_more_bits(i, m.n_layer),
                  " in the first and last 1/8 of layers and every 3rd between"),
    "first_8th": (lambda i, m: i is not None and i < m.n_layer // 8,
                  " in the first 1/8 of layers"),
    "first_16th": (lambda i, m: i is not None and i < m.n_layer // 16,
                   " in the first 1/16 of layers"),
    "first_2": (lambda i, m: i is not None and i < 2, " in layers 0-1"),
    "first_4": (lambda i, m: i is not None and i < 4, " in layers 0-3"),
    "gqa_4": (lambda i, m: m.n_gqa >= 4, " when n_head/n_head_kv >= 4"),
}

# A block type whose block does not divide a row falls back to a type with 32-element
# blocks and about as many bits (llama.cpp's choices); a type with no entry, or a row
# that 32 does not divide either, falls back to F16.
FALLBACK = {T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1,
            T.Q6_K: T.Q8_0, T.IQ4_XS: T.IQ4_NL}

# Under Llama 70B's 8-fold shared attn_v, llama.cpp gives attn_v more bits at little cost.
LLAMA_70B_ATTN_V = {T.Q3_K: T.Q5_K, T.Q4_K: T.Q5_K}


@dataclass(frozen=True)
class Mix:
    name: str                       # the --type name
    default: GGMLType               # the type of every matrix no rule names
    file_type: FT                   # general.file_type
    output: GGMLType                # output.weight (and token_embd when it is tied)
    rules: tuple = ()               # (role, condition, type), first match per role wins
    # kiln's own mixes give token_embd the output's type even when untied; llama.cpp
    # keeps an untied token_embd in the main type.
    embd_as_output: bool = False

    def describe(self) -> str:
        """For --help: the main type's bits per weight, then the tensors that differ."""
        parts = [f"{self.default.name} {bits_per_weight(self.default):.2f} bpw"]
        if self.output != self.default:
            parts.append(f"{'token_embd and output' if self.embd_as_output else 'output'} "
                         f"{self.output.name}")
        by_role = {}
        for role, cond, t in self.rules:
            words = " elsewhere" if cond == "always" and role in by_role else CONDITIONS[cond][1]
            by_role.setdefault(role, []).append(f"{t.name}{words}")
        same = {}  # roles with the same rules are listed together
        for role, rules in by_role.items():
            same.setdefault(", ".join(rules), []).append(role)
        parts += [f"{' and '.join(roles)} {rules}" for rules, roles in same.items()]
        return "; ".join(parts)


def _llama(name, default, file_type, *rules) -> Mix:
    # llama.cpp gives the output matrix 6 bits whatever the main type (Q8_0 mixes aside)
    return Mix(name, default, file_type, T.Q6_K, tuple(rules))


def _kiln(default) -> Mix:
    # 4-bit types store 4.5 (Q4_0) to 5.0 (Q4_1) bits per weight with their scales; the
    # matrices that set the output distribution directly keep 8 bits.
    output = T.Q8_0 if is_block_type(default) and bits_per_weight(default) <= 5.0 else default
    return Mix(default.name.lower(), default, formats.file_type_of(default), output,
               embd_as_output=True)


# The one table of mixes, `--type` name -> Mix. Roles: attn_v, attn_qkv (a fused Q/K/V,
# phi3: llama_tensor_get_type has rules of its own for it, not attn_v's), ffn_down,
# attn_output; other matrices take the default.
MIXES = {m.name: m for m in (
    _kiln(T.F32), _kiln(T.F16), _kiln(T.BF16), _kiln(T.Q4_0), _kiln(T.Q4_1), _kiln(T.Q8_0),
    _llama("q5_0", T.Q5_0, FT.MOSTLY_Q5_0),
    _llama("q5_1", T.Q5_1, FT.MOSTLY_Q5_1),
    _llama("q2_k", T.Q2_K, FT.MOSTLY_Q2_K,
           ("attn_v", "gqa_4", T.Q4_K), ("attn_v", "always", T.Q3_K),
           ("ffn_down", "always", T.Q3_K), ("attn_output", "always", T.Q3_K)),
    _llama("q3_k_s", T.Q3_K, FT.MOSTLY_Q3_K_S),
    _llama("q3_k_m", T.Q3_K, FT.MOSTLY_Q3_K_M,
           ("attn_v", "first_2", T.Q5_K), ("attn_v", "always", T.Q4_K),
           ("ffn_down", "first_16th", T.Q5_K), ("ffn_down", "always", T.Q4_K),
           ("attn_output", "always", T.Q4_K), ("attn_qkv", "always", T.Q4_K)),
    _llama("q3_k_l", T.Q3_K, FT.MOSTLY_Q3_K_L,
           ("attn_v", "always", T.Q5_K), ("ffn_down", "always", T.Q5_K),
           ("attn_output", "always", T.Q5_K), ("attn_qkv", "always", T.Q4_K)),
    _llama("q4_k_s", T.Q4_K, FT.MOSTLY_Q4_K_S,
           ("attn_v", "first_4", T.Q5_K), ("ffn_down", "first_8th", T.Q5_K)),
    _llama("q4_k_m", T.Q4_K, FT.MOSTLY_Q4_K_M,
           ("attn_v", "more_bits", T.Q6_K), ("ffn_down", "more_bits", T.Q6_K),
           ("attn_qkv", "always", T.Q5_K)),
    _llama("q5_k_s", T.Q5_K, FT.MOSTLY_Q5_K_S),
    _llama("q5_k_m", T.Q5_K, FT.MOSTLY_Q5_K_M,
           ("attn_v", "more_bits", T.Q6_K), ("ffn_down", "more_bits", T.Q6_K),
           ("attn_qkv", "always", T.Q6_K)),
    _llama("q6_k", T.Q6_K, FT.MOSTLY_Q6_K),
    _llama("iq4_nl", T.IQ4_NL, FT.MOSTLY_IQ4_NL,
           ("attn_v", "gqa_4", T.Q5_K), ("ffn_down", "first_8th", T.Q5_K)),
    _llama("iq4_xs", T.IQ4_XS, FT.MOSTLY_IQ4_XS,
           ("attn_v", "gqa_4", T.Q5_K), ("ffn_down", "first_8th", T.Q5_K)),
)}

# Types a tensor can be asked for by name (--embed-type): the main types of the mixes and
# the types their rules use.
NAMED_TYPES = {t.name.lower(): t for t in sorted(
    {m.default for m in MIXES.values()} | {m.output for m in MIXES.values()}
    | {r[2] for m in MIXES.values() for r in m.rules})}


def role_of(name: str) -> str:
    """The part a tensor plays, in llama.cpp's quantizer's categories."""
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    for role, key in (("attn_qkv", "attn_qkv.weight"), ("attn_v", "attn_v.weight"),
                      ("attn_output", "attn_output.weight"), ("ffn_down", "ffn_down")):
        if key in name:
            return role
    return "other"


_LAYER = re.compile(r"blk\.(\d+)\.")


def layer_of(name: str) -> int | None:
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None


def fallback(name: str, n_cols: int, t: GGMLType):
    """t, or the type a row of n_cols takes when t's block does not divide it (with a note)."""
    if n_cols % block_size(t) == 0:
        return t, None
    new = FALLBACK.get(t, T.F16)
    if n_cols % block_size(new) != 0:
        new = T.F16
    return new, (f"note: {name}: row length {n_cols} is not a multiple of {block_size(t)}; "
                 f"stored as {new.name} instead of {t.name}")


def tensor_type(name: str, shape: tuple, layer: int | None, mix: Mix, model: ModelFacts,
                embed_type: GGMLType | None = None):
    """Output type of one tensor (NumPy shape: the row width is shape[-1]) and an optional
    note explaining a fallback. embed_type, when given, overrides token_embd and output."""
    if len(shape) < 2:
        return T.F32, None  # norms and other vectors: tiny, and precision matters
    role = role_of(name)
    n_cols = shape[-1]
    is_output = role == "output" or (role == "token_embd" and (model.tied or mix.embd_as_output))
    if embed_type is not None and role in ("output", "token_embd"):
        t = embed_type
    elif is_output:
        # a row the main type cannot block would not suit a 256-block output type either
        t = mix.output if n_cols % block_size(mix.default) == 0 else T.Q8_0
    else:
        t = next((rt for r, cond, rt in mix.rules
                  if r == role and CONDITIONS[cond][0](layer, model)), mix.default)
        if role == "attn_v" and model.is_llama_70b:
            t = LLAMA_70B_ATTN_V.get(t, t)
    return fallback(name, n_cols, t)
