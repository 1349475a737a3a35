"""Named task streams (ordered lists of task specs) for continual learning."""

from __future__ import annotations

from collections.abc import Sequence

from .task import DataError

__all__ = ["STREAMS", "resolve_stream"]

STREAMS: dict[str, list[str]] = {
    "pypi": ["pypi:20news", "pypi:r8", "pypi:bbc", "pypi:rotten_tomatoes"],
    # The three standard task orders of the O-LoRA / OA-Adapter CL benchmark.
    "cl_order1": ["cl:dbpedia", "cl:amazon", "cl:yelp", "cl:agnews"],
    "cl_order2": ["cl:dbpedia", "cl:amazon", "cl:agnews", "cl:yelp"],
    "cl_order3": ["cl:yelp", "cl:amazon", "cl:agnews", "cl:dbpedia"],
}

_PREFIXES = ("cl:", "pypi:", "hf:")


def _check_spec(spec: object) -> str:
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"bad task spec {spec!r} in stream: expected a non-empty string")
    s = spec.strip()
    if not s.lower().startswith(_PREFIXES):
        raise DataError(
            f"bad task spec {s!r}: it is neither a stream name ({', '.join(STREAMS)}) nor a spec "
            f"starting with {', '.join(_PREFIXES)}"
        )
    return s


def resolve_stream(name_or_specs: str | Sequence[str]) -> list[str]:
    """Turn a stream name, a comma-separated string of specs, or a list of specs into a list of
    task specs (a new list; ``STREAMS`` is never aliased)."""
    if isinstance(name_or_specs, str):
        key = name_or_specs.strip()
        if key in STREAMS:
            return list(STREAMS[key])
        if ":" not in key:
            raise DataError(
                f"unknown task stream {key!r}; valid stream names: {', '.join(STREAMS)} "
                "(or give task specs, e.g. 'pypi:r8,cl:agnews')"
            )
        items: Sequence[object] = [p for p in key.split(",") if p.strip()]
    else:
        items = list(name_or_specs)
    specs = [_check_spec(s) for s in items]
    if not specs:
        raise DataError(
            f"empty task stream {name_or_specs!r}; give a stream name ({', '.join(STREAMS)}) "
            "or at least one task spec"
        )
    return specs
