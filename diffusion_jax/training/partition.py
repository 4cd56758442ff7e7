"""Parts of the one params tree {tower: params} chosen by rules: regexes over param paths
"tower/sub/.../leaf" (big_vision's way), each fully matching a path.

    trained, frozen = split(params, (r"unet/.*",))   # the U-Net, and everything else
    params = combine(frozen, trained)                  # the whole tree again

Both parts keep only the leaves they hold: a tower wholly in one part is there as its
whole tree (so today's optimizer states keep their shapes), a tower split by a rule such as
r"unet/.*lora.*" is in both parts with the matching leaves in one and the rest in the other.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping, Sequence

from flax import traverse_util

Rules = Sequence[str]


def _flat(tree: Mapping[str, Any]) -> dict[str, Any]:
    return traverse_util.flatten_dict(tree, sep="/")


def _nested(flat: Mapping[str, Any]) -> dict:
    return traverse_util.unflatten_dict(dict(flat), sep="/") if flat else {}


def paths(tree: Mapping[str, Any]) -> list[str]:
    """Every leaf's path, "tower/sub/.../leaf"."""
    return list(_flat(tree))


def matcher(rules: Rules):
    """path -> whether any of `rules` fully matches it."""
    patterns = [re.compile(rule) for rule in rules]
    return lambda path: any(p.fullmatch(path) for p in patterns)


def split(tree: Mapping[str, Any], rules: Rules) -> tuple[dict, dict]:
    """(the leaves some rule matches, the others), each as a nested tree."""
    matches = matcher(rules)
    flat = _flat(tree)
    return (_nested({k: v for k, v in flat.items() if matches(k)}),
            _nested({k: v for k, v in flat.items() if not matches(k)}))


def select(tree: Mapping[str, Any], *rule_sets: Rules) -> dict:
    """The leaves that every one of `rule_sets` matches."""
    for rules in rule_sets:
        tree = split(tree, rules)[0]
    return tree


def combine(*trees: Mapping[str, Any]) -> dict:
    """One tree of the leaves of all `trees`; a later tree's leaf replaces an earlier one's."""
    flat: dict[str, Any] = {}
    for tree in trees:
        flat.update(_flat(tree))
    return _nested(flat)


def unmatched(rules: Rules, all_paths: Iterable[str]) -> list[str]:
    """The rules that match none of `all_paths`."""
    all_paths = list(all_paths)
    return [rule for rule in rules if not any(re.fullmatch(rule, p) for p in all_paths)]
