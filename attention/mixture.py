"""Per-head mixture of registered patterns: "use all patterns, one per head" (the Sparse
Transformer gives half of the heads to each of its two patterns, Child et al. 2019).

variants="local,strided" (a string, so a command line can set it): the heads are split into
len(members) equal contiguous groups, in that order, and each group is computed by that
registered variant (its XLA function; impl="pallas": its kernel, or, for a member without one,
its XLA function with a warning, so impl="auto" works on a GPU) on its heads only. Heads not
divisible by the number of members is a ValueError.

Members' hyperparameters: their registry defaults, overridden by member_hparams, a string
"member.key=value,..." (e.g. "local.window=8,strided.stride=4"); values are strings converted
and checked by the member's own declarations (Variant.resolve). A member named twice gets the
same overrides in both groups.

Members' state (init_state params and buffers): supported. Each member's arrays are built for
its group's head count and prefixed "m<index>_<member>_" (e.g. "m1_bigbird_random_layout"), so
the model layer holds them as params/buffers of the mixture. Refused, with a ValueError at
init_state and at the call: members with update_buffers (training-time buffer updates, e.g.
routing's centroids), members whose hyperparameters the model supplies (grid shapes, prefix
counts: axial, local2d), and nesting mixture in itself.

Causal: every member must support it (the member's own error otherwise). Dropout: not offered.
Cost: the sum of the members' costs on their heads; the registered class is the members' worst
case among the registry's patterns (strided is O(n^2/s)), i.e. "O(n^2/s)" for the default pair.
"""

from __future__ import annotations

import warnings

import jax.numpy as jnp

import attention
from attention import Text, register
from attention._util import check_causal, check_qkv

NAME = "mixture"
_WARNED: list[str] = []  # members whose missing kernel was reported


def _syntax(text: str) -> str | None:
    names = [m.strip() for m in text.split(",")]
    if not text.strip() or not all(names):
        return "must be comma-separated variant names, e.g. 'local,strided'"
    return None


def _overrides_syntax(text: str) -> str | None:
    for item in filter(None, (x.strip() for x in text.split(","))):
        key, eq, _ = item.partition("=")
        member, dot, field = key.strip().partition(".")
        if not eq or not dot or not member or not field:
            return "must be 'member.key=value,...', e.g. 'local.window=8,strided.stride=4'"
    return None


def members(variants: str, member_hparams: str) -> list[tuple[str, dict]]:
    """[(member name, its resolved hyperparameters)] in head-group order; ValueError for an
    unknown member, an unusable one, or overrides of a member that is not in the list."""
    names = [m.strip() for m in variants.split(",")]
    overrides: dict[str, dict] = {}
    for item in filter(None, (x.strip() for x in member_hparams.split(","))):
        key, _, value = item.partition("=")
        member, _, field = key.strip().partition(".")
        overrides.setdefault(member.strip(), {})[field.strip()] = value.strip()
    stray = set(overrides) - set(names)
    if stray:
        raise ValueError(f"{NAME}: member_hparams names {sorted(stray)}, which are not in "
                         f"variants={variants!r}")
    out = []
    for name in names:
        if name == NAME:
            raise ValueError(f"{NAME}: a mixture cannot contain itself")
        variant = attention.get(name)  # unknown name: ValueError listing the valid ones
        if variant.update_buffers is not None:
            raise ValueError(f"{NAME}: member {name!r} updates its buffers during training "
                             f"(update_buffers); mixtures do not support such members")
        if variant.model_supplies:
            raise ValueError(f"{NAME}: member {name!r} needs hyperparameters the model supplies "
                             f"({sorted(variant.model_supplies)}); mixtures do not support it")
        out.append((name, variant.resolve(overrides.get(name, {}))))
    return out


def prefix(index: int, name: str) -> str:
    return f"m{index}_{name}_"


def _group(heads: int, count: int) -> int:
    if heads % count:
        raise ValueError(f"{NAME}: {heads} heads cannot be split into {count} equal groups "
                         f"(one per member); use a head count divisible by {count}")
    return heads // count


def init_mixture(key, *, q_len, kv_len, num_heads, head_dim, variants, member_hparams):
    """Each member's state for its group of heads, names prefixed m<index>_<member>_."""
    import jax

    mem = members(variants, member_hparams)
    g = _group(num_heads, len(mem))
    state = {"params": {}, "buffers": {}}
    for index, ((name, hp), sub) in enumerate(zip(mem, jax.random.split(key, len(mem)))):
        st = attention.get(name).make_state(sub, q_len=q_len, kv_len=kv_len, num_heads=g,
                                            head_dim=head_dim, **hp)
        for kind in ("params", "buffers"):
            state[kind].update({prefix(index, name) + n: a for n, a in st[kind].items()})
    return state


def _run(impl: str, q, k, v, *, kv_mask, causal, variants, member_hparams, state,
         kernel=None):
    """The members on their head groups with implementation `impl`; kernel: extra keywords
    for the members' Pallas functions (tiles, interpret)."""
    check_qkv(NAME, q, k, v, kv_mask)
    check_causal(NAME, causal, True, q.shape[1], k.shape[1])
    mem = members(variants, member_hparams)
    g = _group(q.shape[2], len(mem))
    prefixes = tuple(prefix(i, n) for i, (n, _) in enumerate(mem))
    unknown = [n for n in state if not n.startswith(prefixes)]
    if unknown:
        raise ValueError(f"{NAME}: unexpected arguments {sorted(unknown)}")
    fns = []
    for name, _ in mem:
        if impl == "pallas" and name not in attention.PALLAS:
            if name not in _WARNED:
                _WARNED.append(name)
                warnings.warn(f"{NAME}: member {name!r} has no Pallas kernel; its heads run "
                              f"the XLA implementation", stacklevel=3)
            fns.append((attention.get(name).fn, False))
        else:
            fns.append((attention.implementation(name, impl), impl == "pallas"))
    outs = []
    for index, ((name, hp), (fn, is_kernel)) in enumerate(zip(mem, fns)):
        p = prefix(index, name)
        arrays = {n[len(p):]: a for n, a in state.items() if n.startswith(p)}
        heads = slice(index * g, (index + 1) * g)
        outs.append(fn(q[:, :, heads], k[:, :, heads], v[:, :, heads], kv_mask=kv_mask,
                       causal=causal, **hp, **arrays, **((kernel or {}) if is_kernel else {})))
    return jnp.concatenate(outs, axis=2).astype(v.dtype)


@register(NAME, supports_causal=True, complexity="O(n^2/s)", init_state=init_mixture,
          hparams={"variants": Text("local,strided", valid=_syntax),
                   "member_hparams": Text("", valid=_overrides_syntax)},
          doc="Heads split into equal contiguous groups, one registered pattern per group (Sparse "
              "Transformer's heads per pattern, Child et al. 2019)")
def mixture_attention(q, k, v, *, kv_mask=None, causal=False, variants, member_hparams,
                      **state):
    """q: [B, Tq, H, D]; k, v: [B, Tk, H, D]; state: the members' prefixed arrays from
    init_state. -> [B, Tq, H, Dv]."""
    return _run("xla", q, k, v, kv_mask=kv_mask, causal=causal, variants=variants,
                member_hparams=member_hparams, state=state)
