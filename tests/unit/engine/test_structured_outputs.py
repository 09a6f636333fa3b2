"""Structured outputs in the engine: every sampled output of the random tiny model (whose unconstrained output is
noise) matches its JSON schema, regex, grammar or choice; the constraint composes with the other sampling options
and async scheduling; bad constraints are refused by name when the engine takes the request."""

from __future__ import annotations

import json
import re
import time

import jsonschema
import pytest
import torch

from herd.engine import EngineConfig, LLMEngine, SamplingParams
from herd.engine.grammar import GrammarCompiler
from herd.engine.grammar_mask import GrammarMask
from herd.engine.penalties import History
from herd.engine.sampler import sample_batch
from herd.engine.sampling_params import SamplingError
from herd.engine.structured_output import StructuredOutput
from herd.model.tiny import make_tiny
from tests.structured_schemas import GRAMMAR, REGEXES, SCHEMAS, in_grammar

PROMPT = [1, *range(5, 25)]


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("scout"), preset="scout", seed=3)


@pytest.fixture(scope="module")
def engine(path):
    return LLMEngine.from_pretrained(path, EngineConfig(kv_cache_mb=16, max_num_seqs=32))


def _fifty(engine, structured, **kwargs):
    params = [SamplingParams(temperature=1.0, max_tokens=256, seed=seed, structured=structured, **kwargs)
              for seed in range(50)]
    return engine.generate([PROMPT] * 50, params)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_fifty_sampled_outputs_validate_against_the_schema(engine, name):
    schema = SCHEMAS[name]
    outs = _fifty(engine, StructuredOutput.json_schema(schema))
    for out in outs:
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), schema)
    assert len({out.text for out in outs}) > 10, "the samples differ: the constraint chose, not a fixed string"


def test_unconstrained_output_of_the_tiny_model_is_not_json(engine):
    """The comparison can fail: without the constraint the same requests give noise."""
    outs = engine.generate([PROMPT] * 10, [SamplingParams(temperature=1.0, max_tokens=32, seed=s) for s in range(10)])
    for out in outs:
        with pytest.raises(ValueError):
            jsonschema.validate(json.loads(out.text), SCHEMAS["nested"])


@pytest.mark.parametrize("pattern", REGEXES)
def test_fifty_sampled_outputs_fullmatch_the_regex(engine, pattern):
    outs = _fifty(engine, StructuredOutput("regex", pattern, "structured_outputs"))
    for out in outs:
        assert out.finish_reason == "stop" and re.fullmatch(pattern, out.text, re.ASCII), out.text


def test_fifty_sampled_outputs_parse_with_the_grammar(engine):
    outs = _fifty(engine, StructuredOutput("grammar", GRAMMAR, "structured_outputs"))
    for out in outs:
        assert out.finish_reason == "stop" and in_grammar(out.text), out.text
    assert not in_grammar("1+") and not in_grammar("(1") and not in_grammar("1 + 2") and in_grammar("(01+2)-3")


def test_a_choice_gives_one_of_its_strings(engine):
    choices = ["yes", "no", "maybe later"]
    outs = _fifty(engine, StructuredOutput.choice(choices))
    assert {out.text for out in outs} <= set(choices) and len({out.text for out in outs}) > 1


def test_a_json_object_that_completes_is_an_object(engine):
    outs = engine.generate([PROMPT] * 10, [SamplingParams(temperature=1.0, max_tokens=300, seed=s,
                                                          structured=StructuredOutput("json_object", ""))
                                           for s in range(10)])
    finished = [out for out in outs if out.finish_reason == "stop"]
    assert finished, "some random objects complete within 300 tokens"
    for out in finished:
        assert isinstance(json.loads(out.text), dict)
    for out in outs:
        assert out.text.startswith("{")


@pytest.mark.parametrize("extra", [
    {"logit_bias": {7: 100.0}}, {"frequency_penalty": 2.0, "presence_penalty": -2.0, "repetition_penalty": 1.5},
    {"top_k": 3}, {"top_p": 0.5, "min_p": 0.1}, {"temperature": 0.0}, {"min_tokens": 5}, {"bad_words": ("red",)},
])
def test_the_constraint_composes_with_every_other_option(engine, extra):
    schema = SCHEMAS["array"]
    params = [SamplingParams(**{"temperature": 1.0, "max_tokens": 256, "seed": s,
                                "structured": StructuredOutput.json_schema(schema), **extra}) for s in range(8)]
    for out in engine.generate([PROMPT] * 8, params):
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), schema)


def test_a_constrained_row_leaves_the_others_in_its_batch_alone(engine):
    plain = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = engine.generate([PROMPT], plain)[0].token_ids
    constrained = SamplingParams(temperature=0, max_tokens=64,
                                 structured=StructuredOutput.json_schema(SCHEMAS["array"]))
    mixed = engine.generate([PROMPT, PROMPT], [plain, constrained])
    assert mixed[0].token_ids == alone
    jsonschema.validate(json.loads(mixed[1].text), SCHEMAS["array"])


def test_a_complete_constraint_ends_the_request_even_when_end_tokens_are_ignored(engine):
    out = engine.generate([PROMPT], SamplingParams(temperature=1.0, seed=2, max_tokens=100, ignore_eos=True,
                                                   structured=StructuredOutput.choice(["alpha", "beta"])))[0]
    assert out.text in ("alpha", "beta") and out.finish_reason == "stop"


def test_async_scheduling_samples_the_same_constrained_tokens(path):
    params = [SamplingParams(temperature=1.0, max_tokens=200, seed=s,
                             structured=StructuredOutput.json_schema(SCHEMAS["nested"])) for s in range(6)]
    outs = [LLMEngine.from_pretrained(path, EngineConfig(kv_cache_mb=16, max_num_seqs=8, async_scheduling=overlap))
            .generate([PROMPT] * 6, params) for overlap in (False, True)]
    assert [o.token_ids for o in outs[0]] == [o.token_ids for o in outs[1]]
    for out in outs[1]:
        jsonschema.validate(json.loads(out.text), SCHEMAS["nested"])


@pytest.mark.parametrize(("structured", "match"), [
    (StructuredOutput("json_schema", '{"type": "strin"}'), "does not compile"),
    (StructuredOutput("json_schema", '{"type": "object", "$ref": "#/nowhere"}'), "does not compile"),
    (StructuredOutput("json_schema", '{"type": "string", "format": "no-such-format"}'), "does not compile"),
    (StructuredOutput("regex", "[a-z", "structured_outputs"), "does not compile"),
    (StructuredOutput("grammar", "start: missing_rule", "structured_outputs"), "does not"),
])
def test_a_constraint_that_does_not_compile_is_refused_by_its_field(engine, structured, match):
    with pytest.raises(SamplingError, match=match) as refused:
        engine.add_request(PROMPT, SamplingParams(structured=structured))
    assert refused.value.field == structured.field
    assert not engine.has_unfinished()


@pytest.mark.parametrize(("kind", "spec", "match"), [
    ("json_schema", "{not json", "not valid JSON"), ("json_schema", "[1, 2]", "JSON object"),
    ("json_object", "{}", "takes no schema"), ("regex", " ", "must not be empty"), ("choice", "[]", "choice"),
    ("choice", '["a", 3]', "choice"), ("xml", "<a/>", "kind"), ("regex", "a" * 100_001, "at most"),
])
def test_a_malformed_constraint_is_refused_when_made(kind, spec, match):
    with pytest.raises(SamplingError, match=match) as refused:
        StructuredOutput(kind, spec, "structured_outputs")
    assert refused.value.field == "structured_outputs"


def test_compiled_constraints_are_cached_and_a_slow_compile_is_refused(path, monkeypatch):
    engine = LLMEngine.from_pretrained(path, EngineConfig(kv_cache_mb=8, max_num_seqs=4))
    compiler: GrammarCompiler = engine.grammars
    calls = []
    compile_once = compiler._compile
    monkeypatch.setattr(compiler, "_compile", lambda s: calls.append(s) or compile_once(s))
    structured = StructuredOutput.json_schema(SCHEMAS["nested"])
    first, second = compiler.start(structured), compiler.start(structured)
    assert len(calls) == 1 and first.matcher is not second.matcher, "one compile; each request its own state"
    slow = GrammarCompiler(engine.tokenizer, timeout_s=0.05)
    compile_slowly = slow._compile
    monkeypatch.setattr(slow, "_compile", lambda s: time.sleep(1.0) or compile_slowly(s))  # a compile past the limit
    with pytest.raises(SamplingError, match="to compile") as refused:
        slow.start(structured)
    assert refused.value.field == "response_format"
    deadline = time.monotonic() + 30
    while not slow.cached(structured) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert slow.cached(structured), "the compile finishes in the background and is cached for the next request"
    slow.start(structured)


def test_the_sampler_chooses_only_allowed_tokens_and_keeps_raw_logprobs():
    vocab = 40
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(0))
    bits = torch.zeros(2, 2, dtype=torch.int32)
    bits[0, 0] = 1 << 5  # row 0: token 5 only
    bits[1, 1] = (1 << 2) | (1 << 3)  # row 2: tokens 34 and 35
    # Row 2 bans both its allowed tokens as bad words: it falls back to choosing between them by the raw logits.
    params = [SamplingParams(temperature=1.0, logprobs=1), SamplingParams(temperature=0),
              SamplingParams(temperature=0, bad_words=("x",))]
    histories = [None, None, History([], (), frozenset(), ((34,), (35,)))]
    for seed in range(5):
        ids, logprobs = sample_batch(logits, params, [0, 0, 0], torch.Generator().manual_seed(seed), histories,
                                     mask=GrammarMask(rows=[0, 2], bits=bits))
        assert ids[0] == 5 and ids[1] == int(logits[1].argmax()) and ids[2] == int(logits[2, 34:36].argmax()) + 34
        assert logprobs[0] is not None
        assert logprobs[0].logprob == pytest.approx(float(torch.log_softmax(logits[0], -1)[5]))


def test_each_of_n_choices_follows_the_constraint_on_its_own(engine):
    """n choices fork after the prompt: each carries its own place in the constraint."""
    schema = SCHEMAS["nested"]
    outs = engine.generate([PROMPT], SamplingParams(temperature=1.0, seed=4, max_tokens=200, n=4,
                                                    structured=StructuredOutput.json_schema(schema)))
    assert sorted(out.index for out in outs) == [0, 1, 2, 3]
    for out in outs:
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), schema)
    assert len({out.text for out in outs}) > 1
