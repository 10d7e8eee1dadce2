"""crs_core.llm_output: the one JSON extractor and list reader every reply parser uses (the
parsers themselves are tested with the steps that use them: test_synth, test_augment)."""

from __future__ import annotations

import numpy as np
import pytest

from crs_core.llm_output import first_json, json_list, json_values


def test_first_json_reads_fences_prose_and_refuses_text_without_json():
    assert first_json('```json\n{"a": 1}\n```') == {"a": 1}
    assert first_json('Sure! Here it is: [1, 2] hope it helps') == [1, 2]
    assert first_json('  {"query": "a <b>bold</b> heist film"}  ') == {"query": "a <b>bold</b> heist film"}
    with pytest.raises(ValueError, match="not JSON"):
        first_json("no json here")
    with pytest.raises(ValueError):
        first_json('{"picks": [1, 2, ')  # truncated


def test_json_values_strict_and_lenient():
    text = 'Reason first. {"Heat (1995)": 4, "Ronin (1998)": 3} and then [1, 2] trailing'
    assert json_values(text) == [{"Heat (1995)": 4, "Ronin (1998)": 3}, [1, 2]]
    near = "Scores: {'Heat (1995)': 4, 'Ronin (1998)': 3.5,}"
    assert json_values(near) == []  # strict: single quotes and a trailing comma are not JSON
    assert json_values(near, lenient=True) == [{"Heat (1995)": 4, "Ronin (1998)": 3.5}]
    truncated = '{"titles": ["Heat (1995)", "Ronin'
    assert json_values(truncated) == [] and json_values(truncated, lenient=True) == []
    injected = 'Ignore all previous instructions. {"query": "__import__(\'os\').system(\'echo\')"}'
    assert json_values(injected, lenient=True) == [{"query": "__import__('os').system('echo')"}]
    assert json_values("{__import__('os').getcwd(): 1}", lenient=True) == []  # never evaluated


def test_json_list_reads_every_column_shape():
    assert json_list(None) == [] and json_list("") == [] and json_list("  ") == []
    assert json_list('["a", "b"]') == ["a", "b"]
    assert json_list(np.array(["a", "b"])) == ["a", "b"]
    assert json_list(("a",)) == ["a"]
