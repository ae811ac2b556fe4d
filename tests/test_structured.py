"""Structured output (runtime/decoding/constrained.py, llguidance over the export's tokenizer.json): every output of
several JSON schemas, sampled and greedy, parses and validates; regexes and Lark / GBNF grammars hold;
generation ends where the grammar does; the engines and the server (response_format, a required tool
call) use it; bad schemas and grammars are one-line errors before anything runs.

The model is the byte-level llama with 4,096 positions: a random model, so it is the mask alone that
makes its output valid. Its JSON schemas ask for compact JSON (x-guidance whitespace_flexible false):
with flexible whitespace a random model may spend every token on spaces, and a cut answer cannot parse.
"""

from __future__ import annotations

import json
import re
import shutil

import jsonschema
import pytest

from kvgraph.graphs import KvgraphError
from kvgraph.runtime import Generator
from kvgraph.runtime.decoding.constrained import Constraint
from kvgraph.runtime.serving.engine import BatchEngine, RequestEngine

COMPACT = {"x-guidance": {"whitespace_flexible": False}}
SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                      "tags": {"type": "array", "items": {"enum": ["a", "bc", "def"]}, "maxItems": 3}},
     "required": ["name", "age", "tags"], "additionalProperties": False, **COMPACT},
    {"anyOf": [{"type": "object", "properties": {"kind": {"const": "circle"}, "r": {"type": "integer", "minimum": 1, "maximum": 99}},
                "required": ["kind", "r"], "additionalProperties": False},
               {"type": "object", "properties": {"kind": {"const": "square"}, "side": {"type": "integer", "minimum": 1, "maximum": 99}},
                "required": ["kind", "side"], "additionalProperties": False}], **COMPACT},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": -9, "maximum": 9},
                                                                               "y": {"type": "integer", "minimum": -9, "maximum": 9}},
                                                "required": ["x", "y"], "additionalProperties": False},
                                      "ok": {"type": "boolean"}, "note": {"type": ["string", "null"], "maxLength": 5}},
     "required": ["point", "ok", "note"], "additionalProperties": False, **COMPACT},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 999}, "minItems": 1, "maxItems": 4, **COMPACT},
]
PROMPTS = ["Describe it as JSON:", "x", "Once upon a time", "{", "The answer", "héllo", "[1, 2", "zz"]


@pytest.fixture(scope="module")
def gen(long_export):
    return Generator.load(long_export)


@pytest.mark.parametrize("schema", SCHEMAS, ids=["object", "any-of", "nested", "array"])
def test_every_output_parses_and_validates(gen, schema):
    constraint = Constraint.build(gen, json_schema=schema)
    outputs = [gen.generate(p, max_new_tokens=200, constraint=constraint, temperature=1.0, seed=i) for i, p in enumerate(PROMPTS)]
    outputs += gen.generate(PROMPTS, max_new_tokens=200, constraint=constraint)  # greedy, a padded batch
    for out in outputs:
        jsonschema.validate(json.loads(out.text), schema)  # 100 %: any failure fails the test
        assert out.finish_reason == "eos" and len(out.token_ids) < 200  # ended where the grammar did, not at the limit
    assert len({o.text for o in outputs}) > 4  # sampling really varied them


def test_regex_and_grammars_hold_and_end_the_text(gen):
    for i in range(6):
        out = gen.generate(f"code {i}", max_new_tokens=50, regex=r"[a-c]{3}-[0-9]{2}", temperature=1.0, seed=i)
        assert re.fullmatch(r"[a-c]{3}-[0-9]{2}", out.text) and len(out.token_ids) <= 7  # six bytes, then eos (or the grammar's end)
    lark = 'start: "yes" | "no" | "maybe " NUMBER\nNUMBER: /[0-9]{1,2}/'
    gbnf = 'root ::= "(" [a-z]+ ")"'
    for i in range(4):
        assert re.fullmatch(r"yes|no|maybe [0-9]{1,2}", gen.generate("?", max_new_tokens=20, grammar=lark, temperature=1.0, seed=i).text)
        assert re.fullmatch(r"\([a-z]+\)", gen.generate("?", max_new_tokens=40, grammar=gbnf, temperature=1.0, seed=i, min_new_tokens=3).text)


def test_engines_and_streams_apply_the_same_mask(gen, long_export, long_export_static):
    schema = SCHEMAS[0]
    want = gen.generate("x", max_new_tokens=120, json_schema=schema).text
    assert "".join(gen.stream("x", max_new_tokens=120, json_schema=schema)) == want
    with RequestEngine(Generator.load(long_export), max_batch=2) as engine:
        assert engine.generate("x", max_new_tokens=120, constraint=Constraint.build(engine.generator, json_schema=schema)).text == want
    static = Generator.load(long_export_static)
    with BatchEngine(static, max_batch=2) as engine:
        text = engine.generate("x", max_new_tokens=120, constraint=Constraint.build(static, json_schema=schema)).text
    jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("options,message", [
    ({"json_schema": "{not json"}, "the JSON schema is not JSON"),
    ({"json_schema": [1, 2]}, "a JSON schema is a JSON object, got list"),
    ({"json_schema": {"type": "integer", "minimum": 5, "maximum": 3}}, r"Unsatisfiable schema: minimum \(5\) is greater than maximum \(3\)"),
    ({"regex": "[a-"}, "the regex is not usable: .*unclosed character class|the regex is not usable"),
    ({"grammar": "start: foo\nfoo: bar"}, "the grammar is not usable: .*unknown name"),
    ({"regex": "a+", "grammar": 'start: "a"'}, "give one of json_schema, regex and grammar, not regex and grammar"),
    ({"regex": "a+", "num_beams": 2}, "structured output .* does not combine with num_beams > 1"),
])
def test_bad_schemas_and_grammars_are_refused_in_one_line(gen, options, message):
    with pytest.raises(KvgraphError, match=message) as raised:
        gen.generate("x", max_new_tokens=8, **options)
    assert "\n" not in str(raised.value)


def test_a_grammar_the_tokenizer_cannot_produce_is_refused(long_export, tmp_path):
    """An export whose tokenizer only knows "a" and "b": a regex of z's has no text it could produce."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    directory = tmp_path / "ab"
    shutil.copytree(long_export, directory)
    tokenizer = Tokenizer(models.BPE(vocab={"<pad>": 0, "<s>": 1, "</s>": 2, "a": 3, "b": 4}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in ("<pad>", "<s>", "</s>")])
    tokenizer.save(str(directory / "tokenizer.json"))
    gen = Generator.load(directory)
    with pytest.raises(KvgraphError, match="no text this tokenizer can produce satisfies the regex"):
        gen.generate("ab", regex="z+")
    assert gen.generate("ab", regex="(a|b){3}", max_new_tokens=5).token_ids[:3] in ([3, 3, 3], [3, 3, 4], [3, 4, 3], [3, 4, 4],
                                                                                    [4, 3, 3], [4, 3, 4], [4, 4, 3], [4, 4, 4])


def test_cli_json_schema_from_a_file(long_export, tmp_path, capsys):
    from kvgraph.runtime.commands.main import main

    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMAS[1]))
    assert main(["generate", str(long_export), "--prompt", "x", "--json-schema", str(schema), "--json", "--max-new-tokens", "80"]) == 0
    jsonschema.validate(json.loads(json.loads(capsys.readouterr().out)["text"]), SCHEMAS[1])
    assert main(["generate", str(long_export), "--prompt", "x", "--regex", "[a-"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("kvgraph generate: error: the regex is not usable") and len(err.splitlines()) == 1
