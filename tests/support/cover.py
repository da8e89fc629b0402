"""Which cases the default run keeps and which only the exhaustive sweep runs.

A sweep over every combination of a rule's flags (or a class's probes) costs one compile per
combination, but most combinations only combine terms other combinations already show. The
default run keeps a *pairwise cover* of each sweep: a subset in which every pair of settings that
occurs together in the sweep occurs together at least once (each flag on and off beside each
other flag on and off), seeded with the first option (everything off: the defaults) and the
fullest one (everything on). The rest of the sweep carries the ``exhaustive`` marker: a plain
``pytest`` deselects it (``addopts`` in ``pyproject.toml``), ``pytest -m exhaustive`` runs it,
and CI runs both (``.ci/run``).

``pairwise(options)`` works on any list of dicts over the same keys: a rule's flag variants
(``Rule.variants()``), a class's probe configurations (``support.matrix.MATRIX``), a rule's
hyperparameter configurations (``support.matrix.RULE_MATRIX``).
"""

import functools
import itertools

import pytest

__all__ = [
    "EXHAUSTIVE",
    "fullest",
    "marks",
    "matrix_cover",
    "matrix_ends",
    "pairwise",
    "pairwise_by",
]

#: the marker of the cases only the exhaustive sweep runs
EXHAUSTIVE = pytest.mark.exhaustive


def _settings(option):
    return tuple(sorted((k, repr(v)) for k, v in option.items()))


def _pairs(option):
    return set(itertools.combinations(_settings(option), 2)) | {(s,) for s in _settings(option)}


def fullest(options, on=None):
    """Index of the option with the most settings ``on`` (``on(key, value)``; by default the
    values that are True), the first of equals."""
    on = on or (lambda _k, v: v is True)
    counts = [sum(bool(on(k, v)) for k, v in o.items()) for o in options]
    return counts.index(max(counts))


def pairwise(options, seeds=None, on=None):
    """Indices, in order, of a subset of ``options`` (dicts over the same keys) that holds every
    single setting and every pair of settings found together in some option.

    Greedy: start from ``seeds`` (by default the first option and the fullest, see
    ``fullest``), then add the option that holds the most pairs not yet held (the first of
    equals) until none is missing. Deterministic for a given list."""
    if not options:
        return []
    seeds = [0, fullest(options, on)] if seeds is None else list(seeds)
    want = set().union(*map(_pairs, options))
    chosen, held = [], set()
    for i in seeds:
        if i not in chosen:
            chosen.append(i)
            held |= _pairs(options[i])
    while held != want:
        gain = [len(_pairs(o) - held) for o in options]
        i = gain.index(max(gain))
        chosen.append(i)
        held |= _pairs(options[i])
    return sorted(chosen)


def pairwise_by(items, group, options, seeds=None, on=None):
    """Indices into ``items`` of the pairwise cover within each ``group(item)`` (a rule, a
    class): ``options(item)`` is the dict of settings an item sweeps; ``seeds(group items)``
    gives each group's seeds as indices into its own items."""
    groups = {}
    for i, item in enumerate(items):
        groups.setdefault(group(item), []).append(i)
    keep = set()
    for members in groups.values():
        sub = [items[i] for i in members]
        picked = pairwise([options(x) for x in sub], None if seeds is None else seeds(sub), on=on)
        keep |= {members[j] for j in picked}
    return sorted(keep)


def marks(keep):
    """``[]`` for a case the default run keeps, else the ``exhaustive`` marker."""
    return [] if keep else [EXHAUSTIVE]


@functools.cache
def matrix_cover():
    """Indices into ``support.matrix.MATRIX`` of the configurations the default run keeps: per
    class, a pairwise cover of its probe combinations seeded with its defaults (its first
    configuration) and its fullest configuration (``support.matrix.FULL``)."""
    from .matrix import FULL, MATRIX

    full = dict(FULL)

    def seeds(sub):
        name = sub[0][0]
        return [0, sub.index((name, full[name]))]

    return frozenset(pairwise_by(MATRIX, lambda c: c[0], lambda c: c[1], seeds=seeds))


@functools.cache
def matrix_ends():
    """Indices into ``support.matrix.MATRIX`` of each class's two ends: its defaults (its first
    configuration) and its fullest configuration (``support.matrix.FULL``). The parity matrix
    keeps the pairwise cover at float32 and these ends at float64: a flag's term is the same
    generated statement at either width, so the cover proves the terms once, and the ends prove
    the float64 build of every class (its plainest and its every-buffer loop)."""
    from .matrix import FULL, MATRIX

    first = {}
    for i, (name, _) in enumerate(MATRIX):
        first.setdefault(name, i)
    return frozenset(first.values()) | {MATRIX.index(c) for c in FULL}
