"""The optimizer matrix every test parametrizes over, derived from the registry and the specs.

``MATRIX``: for every class of ``fastopt.optimizers.CLASSES``, the product of its probes
(``cls.probes()``: each hyperparameter's off and on values, from the rule spec) on top of the
rule's test settings (``SETTINGS``: the spec's ``test_hp``), less the combinations the class
refuses (its constructor raises ValueError: Nesterov with dampening, Momentum without
momentum). ``RULE_MATRIX`` is the same over a rule's own hyperparameters, for tests that call
``fastopt.functional`` or the kernels directly. The selections below derive from them; a new
optimizer shows up in all of them.
"""

import functools
import itertools

from fastopt.kernels import RULES

from fastopt.optimizers import CLASSES

from .oracle import class_of, resolve, rule_hp, spec_of, state_names

__all__ = [
    "CLASSES",
    "FIXED",
    "FULL",
    "MATRIX",
    "RULE_FULL",
    "RULE_MATRIX",
    "SETTINGS",
    "STEPS",
    "config_id",
    "full_config",
    "rule_config_id",
    "settings",
    "slots_read",
    "steps_to_reach",
    "variant_cover",
    "variants_reached",
]

#: per rule: hyperparameters that make every term of the update visible in a few steps (lr
#: large enough to move p; betas small enough that the moments change; ASGD's decay and step
#: schedule, Rprop's step-size clamps within reach): each rule spec's ``test_hp``. A rule
#: without them runs with its defaults.
SETTINGS = {rule: dict(spec.test_hp or {}) for rule, spec in RULES.items()}

#: how many steps the multi-step tests take: enough for every per-step variant (RAdam
#: rectifies from step 6, ASGD with t0 = 0 averages from step 3)
STEPS = 7


def settings(name):
    """The test settings of class ``name``: its rule's, restricted to the class's own
    hyperparameters."""
    cls = class_of(name)
    own = cls._hyper + cls._flags
    return {k: v for k, v in SETTINGS.get(cls._rule, {}).items() if k in own}


def _class_configs(name):
    cls = class_of(name)
    probes = cls.probes()
    out = []
    for values in itertools.product(*probes.values()):
        kw = dict(settings(name), **dict(zip(probes, values)))
        try:
            cls(**kw, backend="numpy")
        except ValueError:  # a combination the class refuses
            continue
        out.append((name, kw))
    return out


#: (class name, constructor kwargs) for every class and every probe combination it accepts
MATRIX = [cfg for name in CLASSES for cfg in _class_configs(name)]


def config_id(cfg):
    """``Name[flag,hyper=value]``: the values that differ from the class's defaults (the test
    settings left out)."""
    name, kw = cfg
    base, shown = resolve(name, {}), settings(name)
    parts = [
        k if v is True else f"{k}={v}"
        for k, v in kw.items()
        if k not in shown and v != base[k] and not (v is False and base[k] is False)
    ]
    return name + ("[" + ",".join(parts) + "]" if parts else "")


def _on(name, kw):
    """How many probes of ``kw`` are on."""
    return sum(kw.get(h) == on for h, (_, on) in class_of(name).probes().items())


def full_config(name):
    """The configuration of class ``name`` with the most state buffers, then the most probes
    on: every buffer it can have, every term it can show."""
    return max(
        (c for c in MATRIX if c[0] == name),
        key=lambda c: (len(state_names(name, resolve(name, c[1]))), _on(*c)),
    )


#: one fullest configuration per class
FULL = [full_config(name) for name in CLASSES]

#: (class, fixed hyperparameter, a value other than its default): every structural flag of
#: every class, and every hyperparameter a class pins (Nesterov's nesterov, AdamW's
#: decoupled_weight_decay)
FIXED = [
    (cls, h, on)
    for name, cls in CLASSES.items()
    for h, (_, on) in cls.probes().items()
    if h in cls._flags
] + [
    (cls, h, (not v) if isinstance(v, bool) else 0.5)
    for cls in CLASSES.values()
    for h, v in cls._pinned.items()
]


def variants_reached(rule, hp, steps=STEPS):
    """The compiled variants (flag tuples) steps 1..``steps`` of ``rule`` with ``hp`` run."""
    spec = RULES[rule]
    hs, out = spec.initial_host_state(hp), []
    for t in range(1, steps + 1):
        flags = tuple(sorted(spec.flags_of(hp, t, hs).items()))
        if flags not in out:
            out.append(flags)
        hs = spec.advance_host_state(hp, t, hs)
    return out


def steps_to_reach(name, kw, steps=STEPS):
    """The fewest steps in which class ``name`` built with ``kw`` reaches every variant it
    reaches in ``steps`` (1 unless a flag switches per step: RAdam 6, ASGD with t0 = 0: 3)."""
    rule = class_of(name)._rule
    hp = rule_hp(name, resolve(name, kw))
    every = set(variants_reached(rule, hp, steps))
    return next(t for t in range(1, steps + 1) if set(variants_reached(rule, hp, t)) == every)


@functools.cache
def variant_cover(steps=STEPS):
    """Configurations of ``MATRIX``, in its order, that together reach every variant the
    classes can launch in ``steps`` steps: each one reaches a variant no earlier one does."""
    seen, out = set(), []
    for name, kw in MATRIX:
        rule = class_of(name)._rule
        new = {
            (rule, v) for v in variants_reached(rule, rule_hp(name, resolve(name, kw)), steps)
        } - seen
        if new:
            seen |= new
            out.append((name, kw))
    return out


def _rule_configs(rule):
    spec = RULES[rule]
    probes = {h.name: (h.default, h.probe) for h in spec.hyper if h.probe is not None}
    out = []
    for values in itertools.product(*probes.values()):
        hp = dict(spec.defaults, **SETTINGS.get(rule, {}), **dict(zip(probes, values)))
        try:
            spec.validate(hp)
        except ValueError:
            continue
        out.append((rule, hp))
    return out


#: (rule, every hyperparameter of the rule) for every rule and probe combination it accepts
RULE_MATRIX = [cfg for rule in RULES for cfg in _rule_configs(rule)]


def _rule_full(rule):
    spec = RULES[rule]
    return max(
        (hp for r, hp in RULE_MATRIX if r == rule),
        key=lambda hp: (
            len(spec.state_names(hp)),
            sum(hp[h.name] == h.probe for h in spec.hyper if h.probe is not None),
        ),
    )


#: rule -> its fullest hyperparameters (every state slot in use, then the most probes on)
RULE_FULL = {rule: _rule_full(rule) for rule in RULES}


def rule_config_id(cfg):
    rule, hp = cfg
    spec = RULES[rule]
    parts = [
        h.name if hp[h.name] is True else f"{h.name}={hp[h.name]}"
        for h in spec.hyper
        if h.probe is not None and hp[h.name] == h.probe
    ]
    return rule + ("[" + ",".join(parts) + "]" if parts else "")


def slots_read(rule, flags):
    """The names of the state slots the ``flags`` variant of ``rule`` reads (the rule spec's
    ``Rule.slots_read``, derived from the rule: ASGD's ``ax`` is only written while it copies
    p, and a compiler drops its load)."""
    spec = RULES[rule]
    return tuple(s for s, read in zip(spec.state, spec.slots_read(flags)) if read)


def _check():
    for name, _ in MATRIX:
        assert spec_of(name) is RULES[class_of(name)._rule]


_check()
