"""The linear-time module pattern matcher: same answers as `re` (and ckptflow's glob / name rules)
on random patterns, refusal of what it cannot match in linear time, steps linear in the name."""
from __future__ import annotations

import random
import re

import pytest

from ckptflow.tasks.plan.model import PlanError
from ckptflow.tasks.planners import linear_match
from ckptflow.tasks.planners.linear_match import MAX_PATTERN_CHARS, MAX_PATTERNS, MAX_PREFIX_CHARS, compile_patterns


def reference(pattern: str, module: str, classes_match: bool = False) -> bool:
    """What ckptflow did before the matcher (compressed-tensors' `re:` = re.match), kept as the oracle."""
    if pattern.startswith("re:"):
        return re.match(pattern[3:], module) is not None
    if "*" in pattern:
        return re.fullmatch(re.escape(pattern).replace(r"\*", ".*"), module) is not None
    if classes_match and pattern[:1].isupper() and "." not in pattern:
        return True
    return module == pattern or module.endswith("." + pattern)


ATOMS = ["a", "b", "_", r"\.", ".", r"\d", r"\w", r"\s", r"\W", "[a-c]", "[^b.]", "[]a]", r"[\d.]", r"\n", r"\x61",
         "-", "{", "é"]
QUANTIFIERS = ["", "", "", "*", "+", "?", "*?", "+?", "??", "{2}", "{1,3}", "{,2}", "{2,}", "{0,1}?"]
ANCHORS = ["^", "$", r"\A", r"\Z", r"\b"]


def random_regex(rng: random.Random, depth: int = 0) -> str:
    """A regex of the subset; quantified groups nest at most twice, so re stays fast on short names."""
    parts = []
    for _ in range(rng.randint(0, 4)):
        roll = rng.random()
        if roll < 0.1:
            parts.append(rng.choice(ANCHORS))
            continue
        if roll < 0.3 and depth < 2:
            inner = "|".join(random_regex(rng, depth + 1) for _ in range(rng.randint(1, 3)))
            atom = rng.choice(["(", "(?:", "(?P<g>"]) .replace("<g>", f"<g{rng.randrange(10**9)}>") + inner + ")"
        else:
            atom = rng.choice(ATOMS)
        parts.append(atom + rng.choice(QUANTIFIERS))
    return "".join(parts)


def random_glob(rng: random.Random) -> str:
    return "".join(rng.choice(["a", "b", ".", "*", "*", "?", "[", "\\", "\n"]) for _ in range(rng.randint(1, 6)))


def random_name(rng: random.Random) -> str:
    if rng.random() < 0.2:
        return rng.choice(["model.layers.0.mlp.gate", "model.layers.1.self_attn.q_proj", "lm_head", "a.b", ""])
    return "".join(rng.choice("ab_.1 -{é\n") for _ in range(rng.randint(0, 9)))


def test_regexes_globs_and_names_answer_as_before_on_random_patterns():
    """400 random pattern lists x 40 names: `matches` and `first` equal the re-based rules."""
    rng = random.Random(27)
    checked = matched = 0
    for k in range(400):
        patterns = []
        for _ in range(rng.randint(1, 3)):
            roll = rng.random()
            patterns.append("re:" + random_regex(rng) if roll < 0.6 else random_glob(rng) if roll < 0.8
                            else rng.choice(["lm_head", "mlp.gate", "b", "a.b", "Linear", ".b", ""]))
        classes = bool(k % 2)
        matcher = compile_patterns(patterns, "test", classes_match=classes)
        names = [random_name(rng) for _ in range(40)]
        for name in names:
            want = next((p for p in patterns if reference(p, name, classes)), None)
            assert matcher.first(name) == want, (patterns, name)
            assert matcher.matches(name) == (want is not None), (patterns, name)
            checked += 1
            matched += want is not None
    assert checked == 16_000 and 3_000 < matched < 13_000  # both answers are well exercised


def test_a_tiny_dfa_cache_gives_the_same_answers(monkeypatch):
    """When the DFA cache is dropped mid-name (MAX_DFA_NODES), the answers do not change."""
    monkeypatch.setattr(linear_match, "MAX_DFA_NODES", 3)
    rng = random.Random(5)
    for _ in range(150):
        pattern = "re:" + random_regex(rng)
        matcher = compile_patterns([pattern], "test")
        for _ in range(20):
            name = random_name(rng) * 3
            assert matcher.matches(name) == reference(pattern, name), (pattern, name)


@pytest.mark.parametrize("pattern, why", [
    (r"re:(\w+)\.\1", "a backreference"),
    (r"re:(?P<x>a)(?P=x)", "a backreference"),
    ("re:.*(?=gate)", "a lookahead"),
    ("re:(?!lm_head).*", "a negative lookahead"),
    ("re:.*(?<=gate)", "a lookbehind"),
    ("re:(?>a+)b", "an atomic group"),
    ("re:a++b", "a possessive quantifier"),
    ("re:(?i)LM_HEAD", "an inline flag"),
    ("re:(?s:.)", "an inline flag"),
    (r"re:\Bgate", r"the escape \B"),
    ("re:a{1001}", "a repeat bound over 1000"),
    ("re:" + "(" * 40 + "a" + ")" * 40, "groups nested deeper than 32"),
    ("re:" + "(" * 450 + "a" + ")" * 450, "groups nested deeper than 32"),  # re itself would overflow the stack
    ("re:(a{1000}){60}", "past 50000 matcher states"),
    ("re:(ab", "is not a valid regex: missing ), unterminated subpattern"),
    ("re:a{3,2}", "is not a valid regex: min repeat greater than max repeat"),
    ("re:*a", "is not a valid regex: nothing to repeat"),
])
def test_patterns_outside_the_subset_are_refused_naming_pattern_and_place(pattern, why):
    with pytest.raises(PlanError) as err:
        compile_patterns(["lm_head", pattern], "config.json quantization_config.ignore")
    msg = str(err.value)
    assert msg.startswith(f"config.json quantization_config.ignore: pattern {pattern[:80]!r}") and why in msg, msg
    assert "\n" not in msg


def test_caps_on_count_and_length_are_named():
    with pytest.raises(PlanError, match=f"{MAX_PATTERNS + 1} patterns; no real config has more than {MAX_PATTERNS}"):
        compile_patterns(["x"] * (MAX_PATTERNS + 1), "cfg.ignore")
    long = "re:" + "a" * MAX_PATTERN_CHARS
    with pytest.raises(PlanError, match=f"^cfg.ignore: pattern 're:a+'… is {len(long)} characters; the limit is "
                                        f"{MAX_PATTERN_CHARS}"):
        compile_patterns([long], "cfg.ignore")
    with pytest.raises(PlanError, match="cfg.ignore must be a list of module names or patterns, got str"):
        compile_patterns("lm_head", "cfg.ignore")  # type: ignore[arg-type]


def test_names_tails_classes_and_which_pattern():
    m = compile_patterns(["lm_head", "layers.0.mlp.gate", "Linear"], "t")
    assert m.first("model.lm_head") == "lm_head" and m.matches("lm_head")
    assert not m.matches("model.xlm_head") and not m.matches("lm_head.weight")
    assert m.first("model.layers.0.mlp.gate") == "layers.0.mlp.gate" and not m.matches("model.layers.10.mlp.gate")
    assert not m.matches("q_proj")  # an ignore list: a class name is only a name
    targets = compile_patterns(["re:.*q_proj$", "Linear"], "t", classes_match=True)
    assert targets.first("a.q_proj") == "re:.*q_proj$" and targets.first("a.k_proj") == "Linear"
    assert not compile_patterns([], "t").matches("anything")


HOSTILE = [r"re:(.|\w)+@", "re:((.+))+@", "re:" + ".*" * 14 + "@", "*" * 14 + "@", "re:(a|a?)+$", r"re:(.*\.){12}@"]


@pytest.mark.parametrize("pattern", HOSTILE)
def test_hostile_patterns_take_steps_linear_in_the_name(pattern):
    """Steps (characters + NFA states visited) for a 2k and a 20k name: at most the NFA's size per
    character, and ten times the name costs at most ten times the steps (re backtracks for hours)."""
    name = "model.layers.0.mlp.experts.1.down_proj."
    steps = []
    for n in (2_000, 20_000):
        m = compile_patterns([pattern], "t")
        assert not m.matches((name * n)[:n])
        assert max(map(len, m._prefixes), default=0) <= MAX_PREFIX_CHARS  # not one prefix per dot: quadratic
        assert m.steps <= n * (len(m._nfa.op) + 1)
        steps.append(m.steps)
    assert steps[1] <= 10 * steps[0] + 1000, steps
    assert steps[1] < 3 * 20_000  # the lazy DFA: about one step per character once warm
