"""Model profiles, as SIE's model configs name them: runtime defaults chosen per request.

A catalog entry's `profiles` maps a name to runtime defaults (`RUNTIME_KEYS`), optionally
`extends: <profile>` (one level, as SIE allows; a child's runtime replaces its parent's when
it sets any). Every model has a `default` profile (empty unless the entry gives one). A
request chooses one by `options.profile` or by a `model:profile` suffix on the model id;
the request's own options win over the profile's. `select` does both for the engine.
"""

from __future__ import annotations

from typing import Any, Mapping

from ..errors import InvalidRequest, ModelNotFound
from .extract import check_values as check_extract_values
from .options import LENGTH_OPTIONS

# runtime key -> the type its value must have in a catalog file
RUNTIME_KEYS: dict[str, type] = {
    "output_types": list, "lora_id": str, "instruction": str, "is_query": bool,
    "pooling": str, "normalize": bool, "query_template": str, "doc_template": str,
    "default_instruction": str, "max_seq_length": int, "query_max_length": int,
    # SIE's MUVERA (multivector -> one fixed-dimension vector): a mapping turns it on ({} =
    # the model's muvera_config), null or absent leaves it off
    "muvera": dict,
    # extract's options (GLiNER, GLiClass, NLI), as SIE's configs set `threshold`
    "threshold": float, "flat_ner": bool, "multi_label": bool, "hypothesis_template": str,
    "merge_adjacent_entities": bool, "classification_type": str,
}
DEFAULT = "default"


def parse_profiles(model: str, raw: Any) -> dict[str, dict[str, Any]]:
    """A catalog entry's `profiles`, resolved (extends applied); ValueError names the fault."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ValueError(f"model {model}: profiles must be a mapping of name -> settings")
    for name, entry in raw.items():
        where = f"model {model}, profile {name!r}"
        if not isinstance(name, str) or not name or ":" in name:
            raise ValueError(f"{where}: a profile name is a non-empty string without ':'")
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: must be a mapping")
        for key, value in entry.items():
            if key == "extends":
                parent = raw.get(value) if isinstance(value, str) else None
                if parent is None:
                    raise ValueError(f"{where} extends unknown profile {value!r}")
                if isinstance(parent, dict) and parent.get("extends") is not None:
                    raise ValueError(f"{where}: profile chaining is not allowed "
                                     f"({name} -> {value} -> {parent['extends']})")
            elif key not in RUNTIME_KEYS:
                raise ValueError(f"{where}: unknown key {key!r} (known: extends, "
                                 f"{', '.join(RUNTIME_KEYS)})")
            elif not _fits(value, RUNTIME_KEYS[key]):
                raise ValueError(f"{where}: {key} must be a {RUNTIME_KEYS[key].__name__}")
            elif key in LENGTH_OPTIONS and value is not None and value < 1:
                raise ValueError(f"{where}: {key} must be a positive number of tokens")
        try:  # extract's options, checked as a request's are
            check_extract_values(entry, f"{where}: ")
        except InvalidRequest as exc:
            raise ValueError(str(exc)) from None
        if not all(isinstance(t, str) for t in entry.get("output_types") or ()):
            raise ValueError(f"{where}: output_types must be a list of strings")
    resolved: dict[str, dict[str, Any]] = {DEFAULT: {}}
    for name, entry in raw.items():
        own = {k: v for k, v in entry.items() if k != "extends" and v is not None}
        parent = raw.get(entry.get("extends"), {}) if entry.get("extends") else {}
        inherited = {k: v for k, v in parent.items() if k != "extends" and v is not None}
        resolved[name] = own or inherited  # SIE: a child's runtime replaces its parent's
    return resolved


def _fits(value: Any, kind: type) -> bool:
    """None (unset), or a value of `kind` (a whole number is a float; a bool is not a number
    here)."""
    kinds = (int, float) if kind is float else kind
    return value is None or (isinstance(value, kinds)
                             and (kind is bool or not isinstance(value, bool)))


def split_ref(ref: str, known: Mapping[str, Any]) -> tuple[str, str | None]:
    """`model` or `model:profile` -> (model, profile or None). A served name containing ':'
    is taken whole; else the suffix starts at the first ':' (hub ids never hold one)."""
    if ref in known or ":" not in ref:
        return ref, None
    base, _, profile = ref.partition(":")
    return base, profile or None


def select(ref: str, profiles_of: Mapping[str, Mapping[str, dict]],
           options: dict[str, Any] | None) -> tuple[str, str, dict[str, Any], dict[str, Any]]:
    """(model, profile name, its runtime defaults, the request's options without `profile`).

    SIE's answers: an unknown suffix is an unknown model (404 MODEL_NOT_FOUND); an unknown
    `options.profile` is 400 INVALID_INPUT "Profile 'x' not found. Available: [...]"."""
    model, suffix = split_ref(ref, profiles_of)
    options = dict(options or {})
    asked = options.pop("profile", None)
    if asked is not None and (not isinstance(asked, str) or not asked.strip()):
        raise InvalidRequest("'options.profile' must be a non-empty string or null")
    profiles = profiles_of.get(model)
    if profiles is None:
        return ref, DEFAULT, {}, options  # the registry answers for an unknown model
    if suffix is not None:
        if suffix not in profiles or suffix == DEFAULT:
            raise ModelNotFound(f"Model '{ref[:200]}' not found")
        if asked not in (None, DEFAULT, suffix):  # SIE's variant has only its own profile
            raise InvalidRequest(f"Profile '{asked[:64]}' not found. Available: ['default']")
        return model, suffix, profiles[suffix], options
    name = asked or DEFAULT
    if name not in profiles:
        raise InvalidRequest(f"Profile '{name[:64]}' not found. Available: {list(profiles)}")
    return model, name, profiles[name], options
